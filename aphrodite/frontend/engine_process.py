"""Starts the engine-core process and owns the two sockets to it.

Shared by the offline LLM (blocking sockets) and the HTTP server (which wraps the same
sockets for asyncio). The engine core spawns the workers; READY arrives once the model
is loaded and the KV pool is sized.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import orjson
import zmq

from aphrodite.config import EngineConfig
from aphrodite.protocol import Frame, decode, encode


class EngineStartError(RuntimeError):
    pass


class EngineDeadError(RuntimeError):
    pass


class ChildProcess:
    """A subprocess with the slice of multiprocessing.Process's API that we use.

    The engine core is started as ``python -m aphrodite.core.engine_core`` rather than
    with multiprocessing's spawn, which would re-import the user's __main__ script (and
    start a second engine) whenever a script lacks an ``if __name__ == "__main__"`` guard.
    """

    def __init__(self, args: list[str]):
        self._popen = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self.pid = self._popen.pid
        self.sentinel = os.pidfd_open(self.pid)    # readable once the process has exited

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self._popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()


class EngineProcess:
    def __init__(self, config: EngineConfig, ctx: zmq.Context | None = None):
        """Start the engine core; does not wait for it (see wait_ready)."""
        self.config = config
        self.ctx = ctx or zmq.Context.instance()
        self.ipc_dir = tempfile.mkdtemp(prefix="aphrodite-")
        input_addr = f"ipc://{self.ipc_dir}/input"
        output_addr = f"ipc://{self.ipc_dir}/output"
        self.input_socket = self.ctx.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        self.input_socket.bind(input_addr)
        self.output_socket = self.ctx.socket(zmq.PULL)
        self.output_socket.setsockopt(zmq.LINGER, 0)
        self.output_socket.bind(output_addr)
        args = [sys.executable, "-m", "aphrodite.core.engine_core", input_addr, output_addr,
                str(os.getpid()), orjson.dumps(config.to_dict()).decode()]
        # PR_SET_PDEATHSIG fires when the thread that started the child ends, so the core
        # may only ask for it when that thread is the main one (it lives as long as we do).
        if threading.current_thread() is threading.main_thread():
            args.append("follow-parent")
        self.proc = ChildProcess(args)
        self.ready: dict | None = None

    @classmethod
    def start(cls, config: EngineConfig, ctx: zmq.Context | None = None,
              ready_timeout_s: float = 600) -> "EngineProcess":
        engine = cls(config, ctx)
        try:
            engine.wait_ready(ready_timeout_s)
        except BaseException:
            engine.shutdown(timeout_s=2)
            raise
        return engine

    def wait_ready(self, timeout_s: float = 600) -> dict:
        deadline = time.monotonic() + timeout_s
        while not self.output_socket.poll(200):
            if not self.proc.is_alive():
                raise EngineStartError(
                    f"engine core exited during start-up (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise EngineStartError(f"engine not ready after {timeout_s:.0f} s")
        frame, body = decode(self.output_socket.recv())
        if frame is Frame.DEAD:
            raise EngineStartError(body.get("message", "engine failed to start"))
        if frame is not Frame.READY:
            raise EngineStartError(f"unexpected first frame {frame.name}")
        self.ready = body
        return body

    def send(self, frame: Frame, body) -> None:
        """Blocks only while the core lives: a PUSH socket whose peer has gone waits forever."""
        message = encode(frame, body)
        while True:
            try:
                self.input_socket.send(message, zmq.NOBLOCK)
                return
            except zmq.Again:
                if not self.proc.is_alive():
                    raise EngineDeadError(
                        f"engine core exited (exit code {self.proc.exitcode})") from None
                self.input_socket.poll(200, zmq.POLLOUT)

    def shutdown(self, timeout_s: float = 10) -> None:
        if self.input_socket.closed:
            return
        if self.proc.is_alive():
            try:
                # One try: a core that has failed may still be exiting, no longer reading.
                self.input_socket.send(encode(Frame.SHUTDOWN, {}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        self.input_socket.close(0)
        self.output_socket.close(0)
        os.close(self.proc.sentinel)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
