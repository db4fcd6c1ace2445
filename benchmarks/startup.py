"""Time from launching `python -m aphrodite.server` to GET /health 200, first and second start.

The first start uses an empty APHRODITE_CACHE_DIR (cold: GGUF tokenizer and weights converted),
the second the same folder (warm). Each server log line is echoed with the seconds since launch,
which shows where start-up time goes.

    python benchmarks/startup.py [--model file.gguf] [--cache-dir DIR] [-- extra server args]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def time_start(server_args: list[str], cache_dir: str, echo: bool, timeout: float = 600) -> float:
    port = free_port()
    env = {**os.environ, "APHRODITE_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "aphrodite.server", "--host", "127.0.0.1",
                             "--port", str(port), *server_args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def echo_log():
        for line in proc.stdout:
            if echo:
                print(f"  [{time.perf_counter() - start:6.2f}s] {line.rstrip()[:160]}", flush=True)

    threading.Thread(target=echo_log, daemon=True).start()
    try:
        while not healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before /health")
            if time.perf_counter() - start > timeout:
                raise TimeoutError("server not healthy in time")
            time.sleep(0.05)
        return time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--quiet", action="store_true", help="do not echo the server log")
    parser.add_argument("server_args", nargs="*")
    args = parser.parse_args()
    server_args = (["--model", args.model] if args.model else []) + args.server_args
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="aphrodite-startup-")
    results = {}
    try:
        for label in ("first", "second"):
            print(f"{label} start (APHRODITE_CACHE_DIR={cache_dir})", flush=True)
            seconds = time_start(server_args, cache_dir, not args.quiet)
            results[f"{label}_start_s"] = round(seconds, 2)
            print(f"{label} start: {seconds:.2f} s to /health 200", flush=True)
    finally:
        if args.cache_dir is None:      # our own temporary folder: converted weights, 100s of MB
            shutil.rmtree(cache_dir, ignore_errors=True)
    print(json.dumps({"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], **results}))


if __name__ == "__main__":
    main()
