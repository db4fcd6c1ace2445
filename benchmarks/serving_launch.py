"""Launching a benchmarked server and reading the memory of its processes.

A launched server runs in its own process group for one benchmark turn. Its memory is read
from /proc/<pid>/status for every process of its tree: VmRSS (resident now), VmHWM (the
peak resident set since the process started, so it covers the model load too), and RssAnon /
RssFile (resident heap versus resident pages of mapped files such as an mmap'd GGUF).
Our server's tree is the frontend, its engine core and the worker(s), which hold the model;
a llama.cpp or transformers server is one process, which holds the model itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
STATUS_FIELDS = {"VmRSS": "rss_mib", "VmHWM": "peak_mib", "RssAnon": "anon_mib",
                 "RssFile": "file_mib"}
ROLES = (("aphrodite.executor.worker", "worker"), ("aphrodite.core.engine_core", "engine-core"),
         ("aphrodite.server", "frontend"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict | None:
    """VmRSS, VmHWM, RssAnon and RssFile of one process in MiB; None once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            out[STATUS_FIELDS[key]] = round(int(value.split()[0]) / 1024, 1)   # kB
    return out


def role(proc: psutil.Process, is_root: bool) -> str:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    for marker, name in ROLES:
        if marker in cmdline:
            return name
    return "server" if is_root else "other"      # "other": e.g. a compiler building kernels


def tree(root_pid: int) -> list[tuple[str, int]]:
    """(role, pid) of the root and every descendant alive now."""
    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return []
    return [(role(p, p.pid == root_pid), p.pid) for p in procs]


def tree_memory(root_pid: int) -> dict:
    """Every process's figures, and sums over the model's processes (the workers where there
    are any, else the root) and over the whole tree. A sum of peaks is an upper bound of the
    group's simultaneous peak: each process's peak may come at a different time."""
    procs = []
    for name, pid in tree(root_pid):
        status = proc_status(pid)
        if status:
            procs.append({"role": name, "pid": pid, **status})
    model = ([p for p in procs if p["role"] == "worker"]
             or [p for p in procs if p["pid"] == root_pid])
    total = lambda group: {k: round(sum(p.get(k, 0.0) for p in group), 1)
                           for k in STATUS_FIELDS.values()}
    return {"processes": procs, "model": total(model), "tree": total(procs)}


class RssWatch:
    """Polls the tree's VmRSS in a thread: the largest model-process and whole-tree sums seen
    (the tree's sum at one moment, unlike a sum of peaks)."""

    def __init__(self, root_pid: int, interval_s: float = 0.25):
        self.root_pid, self.interval_s = root_pid, interval_s
        self.model_max_mib = self.tree_max_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            mem = tree_memory(self.root_pid)
            self.model_max_mib = max(self.model_max_mib, mem["model"]["rss_mib"])
            self.tree_max_mib = max(self.tree_max_mib, mem["tree"]["rss_mib"])
            self._stop.wait(self.interval_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"model_rss_max_mib": self.model_max_mib, "tree_rss_max_mib": self.tree_max_mib}


class Launched:
    """A server process that lives for one backend's turn, in its own process group."""

    def __init__(self, argv: list[str], port: int, log_path: str):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.base_url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; "
                                   f"see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout_s:.0f} s; see {self.log.name}")

    def memory(self) -> dict:
        return tree_memory(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
