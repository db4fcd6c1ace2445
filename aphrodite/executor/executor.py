"""Engine-core side of the workers: spawns one worker process per device and talks to them.

No torch here: this module runs inside the engine-core process, which must stay free of
torch threads. Every rank receives each STEP frame; only rank 0 answers with a RESULT.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import zmq

from aphrodite.config import EngineConfig
from aphrodite.protocol import Frame, decode, encode


class WorkerFailure(RuntimeError):
    """A worker died, hung or reported a fatal error."""


class Executor:
    def __init__(self, config: EngineConfig, ctx: zmq.Context, ipc_dir: str):
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.result_socket = ctx.socket(zmq.PULL)
        result_addr = f"ipc://{ipc_dir}/results"
        self.result_socket.bind(result_addr)
        self.step_sockets = []
        self.procs: list[multiprocessing.Process] = []
        mp = multiprocessing.get_context("spawn")
        from aphrodite.executor.worker import run_worker  # torch-free at import time
        for rank in range(self.world_size):
            step_socket = ctx.socket(zmq.PUSH)
            step_addr = f"ipc://{ipc_dir}/steps-{rank}"
            step_socket.bind(step_addr)
            self.step_sockets.append(step_socket)
            proc = mp.Process(target=run_worker, name=f"aphrodite-worker-{rank}", daemon=True,
                              args=(config.to_dict(), rank, step_addr, result_addr,
                                    os.getpid(), ipc_dir))
            proc.start()
            self.procs.append(proc)
        self.ready = self._wait_ready()

    def _wait_ready(self) -> dict:
        infos: dict[int, dict] = {}
        while len(infos) < self.world_size:
            self.check_alive()
            if not self.result_socket.poll(200):
                continue
            frame, body = decode(self.result_socket.recv())
            if frame is Frame.DEAD:
                raise WorkerFailure(f"worker failed to start: {body.get('message')}")
            if frame is Frame.READY:
                infos[body["rank"]] = body
        ready = dict(infos[0])
        ready.pop("rank", None)
        ready["num_kv_blocks"] = min(info["num_kv_blocks"] for info in infos.values())
        ready["worker_pids"] = [p.pid for p in self.procs]
        return ready

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.is_alive():
                raise WorkerFailure(f"worker {proc.name} (pid {proc.pid}) died "
                                    f"with exit code {proc.exitcode}")

    def send(self, frame: Frame, body) -> None:
        message = encode(frame, body)
        for socket in self.step_sockets:
            try:
                # Never block: a PUSH socket whose worker is gone would wait forever.
                socket.send(message, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.check_alive()
                raise WorkerFailure("a worker stopped taking steps")

    def recv_result(self) -> dict:
        """Read one frame from rank 0 (call when result_socket is readable)."""
        frame, body = decode(self.result_socket.recv())
        if frame is Frame.DEAD:
            raise WorkerFailure(f"worker error: {body.get('message')}")
        if frame is not Frame.RESULT:
            raise WorkerFailure(f"unexpected frame {frame.name} from a worker")
        return body

    def shutdown(self, timeout_s: float = 5.0) -> None:
        try:
            self.send(Frame.SHUTDOWN, {})
        except (zmq.ZMQError, WorkerFailure):
            pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        # Unsent steps to a dead worker would otherwise block the context's term().
        for socket in (*self.step_sockets, self.result_socket):
            socket.close(linger=0)
