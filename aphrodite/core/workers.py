"""Engine-core side of the workers: spawns one worker process per device and talks to them.

No torch here: this module runs inside the engine-core process, which must stay free of
torch threads. Every rank receives each STEP frame; only rank 0 answers with a RESULT.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import sys
import time

import zmq

from aphrodite.config import EngineConfig
from aphrodite.protocol import Frame, decode, encode


class WorkerFailure(RuntimeError):
    """A worker died, hung or reported a fatal error."""


class ParentGone(RuntimeError):
    """The process that started this one has exited."""


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent exits.

    Polling getppid() alone misses a parent that dies while this process is blocked
    (loading weights, a long step). The kernel ties the signal to the *thread* that
    forked us, so callers only use it when the parent started us from its main thread.
    Elsewhere (or if prctl fails) the getppid() polls remain the only guard.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:     # it died before prctl took effect
        raise ParentGone(f"parent process {parent_pid} is gone")


class Executor:
    def __init__(self, config: EngineConfig, ctx: zmq.Context, ipc_dir: str,
                 parent_pid: int | None = None):
        self.config = config
        self.parent_pid = parent_pid      # the frontend: stop waiting for workers if it goes
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
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                raise ParentGone("the frontend exited while the workers were loading")
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

    def shutdown(self, timeout_s: float = 5.0, graceful: bool = True) -> None:
        """Stop the workers: SHUTDOWN and up to timeout_s to exit, then SIGKILL.

        graceful=False (after a failure) kills at once: a hung or SIGSTOPped worker can
        never act on SHUTDOWN, and SIGKILL is the one signal a stopped process obeys.
        """
        if graceful:
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
        for proc in self.procs:
            proc.join(2)
        # Unsent steps to a dead worker would otherwise block the context's term().
        for socket in (*self.step_sockets, self.result_socket):
            socket.close(linger=0)
