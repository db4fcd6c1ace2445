"""Starts the engine-core process and owns the two sockets to it.

Shared by the offline LLM (blocking sockets) and the HTTP server (which wraps the same
sockets for asyncio). The engine core starts the workers; READY arrives once the model
is loaded and the KV pool is sized.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from copy import copy

import zmq

from aphrodite import processes
from aphrodite.config import EngineConfig
from aphrodite.protocol import EngineReady, Frame, decode, encode


class EngineStartError(RuntimeError):
    pass


class EngineDeadError(RuntimeError):
    pass


class EngineProcess:
    def __init__(self, config: EngineConfig, ctx: zmq.Context | None = None):
        """Start the engine core; does not wait for it (see wait_ready)."""
        self.config = config
        self.ctx = ctx or zmq.Context.instance()
        self.ipc_dir = tempfile.mkdtemp(prefix="aphrodite-")
        input_addr = f"ipc://{self.ipc_dir}/input"
        output_addr = f"ipc://{self.ipc_dir}/output"
        self.input_socket = processes.socket(self.ctx, zmq.PUSH, input_addr, bind=True)
        self.output_socket = processes.socket(self.ctx, zmq.PULL, output_addr, bind=True)
        self.proc = processes.ChildProcess(
            "aphrodite.core.engine_core",
            {"config": config.to_dict(), "input_addr": input_addr, "output_addr": output_addr},
            name="aphrodite-engine-core")
        self.ready: EngineReady | None = None
        self.tokenizer_shared = False

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

    def wait_ready(self, timeout_s: float = 600) -> EngineReady:
        deadline = time.monotonic() + timeout_s
        while not self.output_socket.poll(200):
            if not self.proc.is_alive():
                raise EngineStartError(
                    f"engine core exited during start-up (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise EngineStartError(f"engine not ready after {timeout_s:.0f} s")
        frame, body = decode(self.output_socket.recv(), ready=EngineReady)
        if frame is Frame.DEAD:
            raise EngineStartError(body.message or "engine failed to start")
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

    def share_tokenizer(self, tokenizer) -> None:
        """Write the fast tokenizer's JSON where the engine core compiles grammars from it
        (<ipc_dir>/tokenizer.json), once; call before the first structured-outputs ADD.
        Raises ValueError for a tokenizer without a fast (Rust) backend."""
        if self.tokenizer_shared:
            return
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("structured outputs need a fast tokenizer (tokenizer.json); "
                             "this model's tokenizer has none")
        backend = copy(backend)             # as llguidance.hf does: no padding, no truncation
        backend.no_padding()
        backend.no_truncation()
        path = os.path.join(self.ipc_dir, "tokenizer.json")
        fd, temp = tempfile.mkstemp(dir=self.ipc_dir, prefix=".tokenizer-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(backend.to_str())
        os.replace(temp, path)              # the core never reads half a file
        self.tokenizer_shared = True

    def shutdown(self, timeout_s: float = 10) -> None:
        if self.input_socket.closed:
            return
        processes.stop_children([self.proc], lambda: processes.send_shutdown(self.input_socket),
                                timeout_s)
        self.input_socket.close(0)
        self.output_socket.close(0)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
