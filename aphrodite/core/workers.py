"""The engine core's side of the worker processes: starts one per device, sends each STEP
to all of them, and reads rank 0's RESULT.

No torch here: this runs inside the engine-core process, which must stay free of torch
threads. The workers themselves run aphrodite/executor/worker.py.
"""

from __future__ import annotations

import os

import zmq

from aphrodite import processes
from aphrodite.config import EngineConfig
from aphrodite.protocol import (EngineReady, Failure, Frame, GrammarMask, SchedulerOutput,
                                StepResult, WorkerReady, decode, encode, encode_bitmask)


class WorkerFailure(RuntimeError):
    """A worker died, hung or reported a fatal error."""


class WorkerGroup:
    def __init__(self, config: EngineConfig, ctx: zmq.Context, ipc_dir: str,
                 frontend_pid: int | None = None):
        """Starts the workers and waits until every one has loaded the model (`ready`)."""
        self.config = config
        self.frontend_pid = frontend_pid   # stop waiting for the workers if it goes
        self.world_size = config.tensor_parallel_size
        result_addr = f"ipc://{ipc_dir}/results"
        self.result_socket = processes.socket(ctx, zmq.PULL, result_addr, bind=True)
        self.step_sockets: list[zmq.Socket] = []
        self.procs: list[processes.ChildProcess] = []
        for rank in range(self.world_size):
            step_addr = f"ipc://{ipc_dir}/steps-{rank}"
            self.step_sockets.append(processes.socket(ctx, zmq.PUSH, step_addr, bind=True))
            self.procs.append(processes.ChildProcess(
                "aphrodite.executor.worker",
                {"config": config.to_dict(), "rank": rank, "step_addr": step_addr,
                 "result_addr": result_addr, "ipc_dir": ipc_dir},
                name=f"aphrodite-worker-{rank}"))
        self.ready = self._wait_ready()

    def _wait_ready(self) -> EngineReady:
        infos: dict[int, WorkerReady] = {}
        while len(infos) < self.world_size:
            self.check_alive()
            if self.frontend_pid is not None and os.getppid() != self.frontend_pid:
                raise processes.ParentGone("the frontend exited while the workers were loading")
            if not self.result_socket.poll(200):
                continue
            frame, body = decode(self.result_socket.recv(), ready=WorkerReady)
            if frame is Frame.DEAD:
                raise WorkerFailure(f"worker failed to start: {body.message}")
            if frame is Frame.READY:
                infos[body.rank] = body
        first = infos[0]
        return EngineReady(
            num_kv_blocks=min(info.num_kv_blocks for info in infos.values()),
            block_size=self.config.block_size, max_model_len=first.max_model_len,
            vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
            device=first.device, dtype=first.dtype, worker_pids=[p.pid for p in self.procs])

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.is_alive():
                raise WorkerFailure(f"worker {proc.name} (pid {proc.pid}) died "
                                    f"with exit code {proc.exitcode}")

    def send_step(self, step: SchedulerOutput) -> None:
        self._send(encode(Frame.STEP, step))

    def send_grammar_mask(self, header: GrammarMask, bitmask) -> None:
        """To rank 0 only: the other ranks' samples are discarded."""
        self._send_parts(self.step_sockets[0], encode_bitmask(header, bitmask))

    def _send(self, message: bytes) -> None:
        for sock in self.step_sockets:
            self._send_parts(sock, [message])

    def _send_parts(self, sock: zmq.Socket, parts: list) -> None:
        try:
            # Never block: a PUSH socket whose worker is gone would wait forever.
            sock.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.check_alive()
            raise WorkerFailure("a worker stopped taking steps") from None

    def recv_result(self) -> StepResult:
        """Read one frame from rank 0 (call when result_socket is readable)."""
        frame, body = decode(self.result_socket.recv())
        if isinstance(body, Failure):
            raise WorkerFailure(f"worker error: {body.message}")
        if frame is not Frame.RESULT:
            raise WorkerFailure(f"unexpected frame {frame.name} from a worker")
        return body

    def shutdown(self, timeout_s: float = 5.0, graceful: bool = True) -> None:
        """SHUTDOWN and up to timeout_s to exit, then signals (see processes.stop_children)."""
        processes.stop_children(self.procs, lambda: self._send(encode(Frame.SHUTDOWN)),
                                timeout_s, graceful)
        # Unsent steps to a dead worker would otherwise block the context's term().
        for sock in (*self.step_sockets, self.result_socket):
            sock.close(linger=0)
