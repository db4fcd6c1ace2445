"""The server's process tree: memory use for the stats line, and no orphans at exit.

Workers are children of the engine core, not of this process. If the engine core is
killed they are re-parented away from us, so the engine's subtree is snapshotted while
it runs and every process in the snapshot is killed at exit if it is still running
(psutil compares creation times, so a recycled pid is never hit).
"""

from __future__ import annotations

import logging
import os

import psutil

logger = logging.getLogger("aphrodite.server")


class ProcessTree:
    """This process plus the engine core's subtree."""

    def __init__(self) -> None:
        self.root = psutil.Process(os.getpid())
        self.descendants: list[psutil.Process] = []

    def track(self, pid: int) -> None:
        """Remember `pid` and its current descendants; call again to pick up new ones."""
        try:
            proc = psutil.Process(pid)
            found = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return
        known = {p.pid for p in self.descendants}
        self.descendants.extend(p for p in found if p.pid not in known)

    def snapshot(self) -> None:
        for proc in list(self.descendants):
            if proc.is_running():
                self.track(proc.pid)

    def _alive(self) -> list[psutil.Process]:
        self.snapshot()
        return [p for p in self.descendants if _running(p)]

    def rss_bytes(self) -> int:
        total = 0
        for proc in [self.root, *self._alive()]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def pids(self) -> list[int]:
        return [p.pid for p in self._alive()]

    def kill_remaining(self, timeout_s: float = 3.0) -> None:
        """SIGTERM, then SIGKILL, every descendant still running.

        A stopped (SIGSTOPped) process cannot act on SIGTERM, so it gets SIGKILL at once.
        """
        alive = self._alive()
        if alive:
            # Most leave on their own once the engine core is gone (workers poll their parent).
            _, alive = psutil.wait_procs(alive, timeout=1.0)
            alive = [p for p in alive if _running(p)]
        if not alive:
            return
        logger.warning("Stopping leftover processes %s", [p.pid for p in alive])
        for proc in alive:
            try:
                if proc.status() == psutil.STATUS_STOPPED:
                    proc.kill()
                else:
                    proc.terminate()
            except psutil.Error:
                pass
        _, still = psutil.wait_procs(alive, timeout=timeout_s)
        for proc in still:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(still, timeout=timeout_s)


def _running(proc: psutil.Process) -> bool:
    """Running and not a zombie: an orphan that has exited stays a zombie until whatever
    adopted it reaps it (here, slowly, a container's init), but there is nothing to stop."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def gpu_memory_bytes(pids: list[int]) -> int | None:
    """GPU memory held by these processes, via NVML when it is installed; else None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        total = 0
        wanted = set(pids)
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in wanted and proc.usedGpuMemory:
                    total += proc.usedGpuMemory
        return total
    except Exception:
        return None
