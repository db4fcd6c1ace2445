"""Process life cycle shared by the three kinds of process: spawning a child, dying with the
parent, logging, the ZeroMQ sockets between them, and stopping children in order.

The server (frontend) starts the engine core; the engine core starts one worker per device.
Each child is started as ``python -m <module> <args>`` (ChildProcess), never with
multiprocessing's spawn, which would re-import the user's __main__ script (and start a
second engine) whenever a script lacks an ``if __name__ == "__main__"`` guard. A child asks
Linux to signal it when its parent dies (die_with_parent) and also polls getppid(), so no
child outlives the server. No torch here: the frontend and the engine core import this.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import orjson
import zmq

from aphrodite.protocol import Frame, encode


class ParentGone(RuntimeError):
    """The process that started this one has exited."""


class Terminated(BaseException):
    """SIGTERM arrived (see raise_on_sigterm)."""


LOG_DATE_FORMAT = "%m-%d %H:%M:%S"


def configure_logging(role: str, stream=None) -> None:
    """One log format for the three kinds of process; each line names its process
    (`server`, `engine`, `worker-0`). Children log to stderr (their stdout is the parent's)."""
    logging.basicConfig(level=os.environ.get("APHRODITE_LOG_LEVEL", "INFO"),
                        stream=stream or sys.stderr,
                        format=f"%(levelname)s %(asctime)s {role} %(message)s",
                        datefmt=LOG_DATE_FORMAT)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into Terminated, once: a second SIGTERM must not cut the clean-up short."""
    def handler(_signum, _frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()
    signal.signal(signal.SIGTERM, handler)


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent exits.

    Polling getppid() alone misses a parent that dies while this process is blocked
    (loading weights, a long step). The kernel ties the signal to the *thread* that
    forked us, so spawn() only asks for it when the parent started us from its main
    thread. Elsewhere (or if prctl fails) the getppid() polls remain the only guard.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:     # it died before prctl took effect
        raise ParentGone(f"parent process {parent_pid} is gone")


class ChildProcess:
    """A child started as ``python -m module``, with the slice of multiprocessing.Process's
    API the callers use; `sentinel` is a pidfd, readable once the process has exited."""

    def __init__(self, module: str, args: dict, name: str):
        """`args` reaches the child's main as a dict (see child_args)."""
        args = {**args, "parent_pid": os.getpid(),
                # PR_SET_PDEATHSIG fires when the thread that started the child ends, so the
                # child may only ask for it when that thread is the main one.
                "follow_parent": threading.current_thread() is threading.main_thread()}
        self.name = name
        self._popen = subprocess.Popen([sys.executable, "-m", module, orjson.dumps(args).decode()],
                                       stdin=subprocess.DEVNULL)
        self.pid = self._popen.pid
        self.sentinel = os.pidfd_open(self.pid)

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

    def close(self) -> None:
        os.close(self.sentinel)


def child_args() -> dict:
    """The dict a ChildProcess passed to this process's main."""
    return orjson.loads(sys.argv[1])


def follow_parent(args: dict, sig: int) -> None:
    """Called first by a child: `sig` when the parent dies (if it may ask for it), and
    ParentGone if the parent has exited already."""
    if args["follow_parent"]:
        die_with_parent(args["parent_pid"], sig)
    elif os.getppid() != args["parent_pid"]:
        raise ParentGone("the parent exited before this process started")


def parent_alive(args: dict) -> bool:
    return os.getppid() == args["parent_pid"]


def stop_children(procs: list[ChildProcess], shutdown, timeout_s: float,
                  graceful: bool = True) -> None:
    """Stop children: `shutdown()` (sends them SHUTDOWN) and up to timeout_s to exit, then
    SIGTERM (2 s) and SIGKILL.

    graceful=False (after a failure) kills at once: a hung or SIGSTOPped child can never
    act on SHUTDOWN, and SIGKILL is the one signal a stopped process obeys.
    """
    if graceful:
        try:
            shutdown()
        except (zmq.ZMQError, RuntimeError):
            pass
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(2)
    for proc in procs:
        proc.kill()
        proc.join(2)
        proc.close()


def send_shutdown(socket: zmq.Socket) -> None:
    """One try, never blocking: a peer that has failed may still be exiting, no longer reading."""
    socket.send(encode(Frame.SHUTDOWN), zmq.NOBLOCK)


def socket(ctx: zmq.Context, kind: int, address: str, bind: bool, linger_ms: int = 0,
           send_timeout_ms: int | None = None) -> zmq.Socket:
    """A PUSH or PULL socket on an ipc:// address. The binding side creates the address."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if send_timeout_ms is not None:
        sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    if bind:
        sock.bind(address)
    else:
        sock.connect(address)
    return sock
