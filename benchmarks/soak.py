"""Soak run: the real server under N minutes of mixed traffic, then a check that it is idle.

    python benchmarks/soak.py --minutes 10 [--concurrency 8] [--json out.json]
                              [-- extra server args]

Traffic: chat and text completions, streaming or not, max_tokens from 1 to 128, and a share
of clients that give up early (a stream dropped after a few chunks, a request timed out).
Reports request counts by outcome, errors, p50/p99 latency, the RSS of each process
(frontend, engine core, workers) at the start and the end, and, once traffic has stopped,
KV usage and the per-request state left in each process (all should be 0).
Not a CI test: it takes minutes. Aimed only at 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVER_ARGS = ["--max-model-len", "512", "--kv-cache-memory", "256MiB",
                       "--max-num-seqs", "16", "--disable-log-requests"]
IDLE_GAUGES = ("aphrodite:kv_cache_usage_perc", "aphrodite:num_requests_running",
               "aphrodite:num_requests_waiting", "aphrodite:frontend_requests",
               "aphrodite:engine_core_requests", "aphrodite:worker_requests")
HANG_S = 600
PROMPTS = ["Tell me about the sea.", "Write a haiku about autumn.", "What is 17 times 23?",
           "Describe a city at night.", "List five fruits.", "Explain rain to a child."]


# ---- the server ------------------------------------------------------------------------------
class Server:
    def __init__(self, extra_args: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aphrodite.server", "--served-model-name", "soak",
             *DEFAULT_SERVER_ARGS, *extra_args, "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))

    def find(self, pattern: str, timeout_s: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.log):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{pattern!r} not in the server log:\n" + "\n".join(self.log[-30:]))

    def processes(self) -> dict[str, psutil.Process]:
        """frontend, core and worker-N, from the pids the server logs at start-up."""
        core = int(self.find(r"Engine core process: pid (\d+)").group(1))
        workers = self.find(r"worker_pids=\[([\d, ]+)\]").group(1).split(",")
        named = {"frontend": self.proc.pid, "core": core}
        named.update({f"worker-{i}": int(pid) for i, pid in enumerate(workers)})
        return {name: psutil.Process(pid) for name, pid in named.items()}


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Sums of /metrics samples by name (the gauges carry one label set)."""
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    return values


def rss_mib(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in procs.items():
        try:
            out[name] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.Error:
            out[name] = None
    return out


# ---- traffic ---------------------------------------------------------------------------------
@dataclass
class Tally:
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)     # completed requests, seconds
    ttfts: list[float] = field(default_factory=list)         # completed streams, seconds

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def request_body(rng: random.Random, chat: bool, stream: bool) -> dict:
    body = {"model": "soak", "max_tokens": rng.choice([1, 8, 32, 64, 128]), "stream": stream,
            "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rng.randrange(1 << 30)}
    prompt = rng.choice(PROMPTS)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def one_request(session, url: str, rng: random.Random, abort_rate: float, tally: Tally):
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    body = request_body(rng, chat, stream)
    endpoint = f"{url}/v1/{'chat/completions' if chat else 'completions'}"
    give_up = rng.random() < abort_rate
    kind = f"{'chat' if chat else 'text'}-{'stream' if stream else 'plain'}"
    started = time.monotonic()
    try:
        if stream:
            drop_after = rng.randint(1, 4) if give_up else None
            async with session.post(endpoint, json=body) as r:
                if r.status != 200:
                    tally.errors.append(f"{kind}: HTTP {r.status} {(await r.text())[:200]}")
                    return tally.count("error")
                chunks, first = 0, None
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    first = first or time.monotonic()
                    if b'"error"' in line:
                        tally.errors.append(f"{kind}: {line[:200]!r}")
                        return tally.count("error")
                    chunks += 1
                    if drop_after is not None and chunks >= drop_after:
                        return tally.count("aborted (stream dropped)")
                tally.ttfts.append(first - started)
        else:
            total = rng.uniform(0.05, 1.0) if give_up else None
            timeout = aiohttp.ClientTimeout(total=total, sock_read=HANG_S)
            try:
                async with session.post(endpoint, json=body, timeout=timeout) as r:
                    text = await r.text()
                    if r.status != 200:
                        tally.errors.append(f"{kind}: HTTP {r.status} {text[:200]}")
                        return tally.count("error")
            except asyncio.TimeoutError:
                if give_up:
                    return tally.count("aborted (client timeout)")
                raise
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        tally.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
        return tally.count("error")
    tally.latencies.append(time.monotonic() - started)
    tally.count("completed")


async def traffic(url: str, seconds: float, concurrency: int, abort_rate: float,
                  seed: int) -> Tally:
    """Clients start requests until the deadline; requests already running then finish."""
    tally = Tally()
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    # No overall limit (a loaded CPU makes long answers slow), but a stream or answer that
    # goes HANG_S without a byte counts as a hang: an error.
    timeout = aiohttp.ClientTimeout(total=None, sock_read=HANG_S)

    async def client_loop(i: int, session):
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            await one_request(session, url, rng, abort_rate, tally)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client_loop(i, session) for i in range(concurrency)))
    return tally


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 3)


async def wait_idle(url: str, timeout_s: float = 60) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + timeout_s
        while True:
            values = await metrics(session, url)
            idle = {name: values.get(name) for name in IDLE_GAUGES}
            if not any(idle.values()) or time.monotonic() > deadline:
                return idle
            await asyncio.sleep(0.5)


async def warm_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/completions", json={
                "model": "soak", "prompt": "Hello", "max_tokens": 4}) as r:
            r.raise_for_status()


# ---- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--abort-rate", type=float, default=0.15,
                        help="share of requests whose client gives up early")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("server_args", nargs="*", help="extra server arguments (after --)")
    args = parser.parse_args()

    server = Server(args.server_args)
    try:
        server.find(r"Serving .* on http", timeout_s=600)
        procs = server.processes()
        asyncio.run(warm_up(server.url))
        rss_start = rss_mib(procs)
        print(f"server up on {server.url}; pids {({k: p.pid for k, p in procs.items()})}; "
              f"{args.minutes} min of traffic, {args.concurrency} clients", flush=True)
        started = time.monotonic()
        tally = asyncio.run(traffic(server.url, args.minutes * 60, args.concurrency,
                                    args.abort_rate, args.seed))
        elapsed = time.monotonic() - started
        tail_s = max(0.0, elapsed - args.minutes * 60)   # requests running at the deadline
        idle = asyncio.run(wait_idle(server.url))
        rss_end = rss_mib(procs)
        server.proc.send_signal(signal.SIGTERM)
        exit_code = server.proc.wait(60)
        left = [name for name, p in procs.items()
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()

    report = {
        "traffic_minutes": args.minutes, "last_requests_finished_after_s": round(tail_s, 1),
        "concurrency": args.concurrency,
        "requests": sum(tally.outcomes.values()), "outcomes": tally.outcomes,
        "errors": len(tally.errors), "first_errors": tally.errors[:5],
        "latency_s": {"p50": percentile(tally.latencies, 50), "p99": percentile(tally.latencies, 99)},
        "stream_ttft_s": {"p50": percentile(tally.ttfts, 50), "p99": percentile(tally.ttfts, 99)},
        "rss_mib_start": rss_start, "rss_mib_end": rss_end,
        "after_traffic": idle, "exit_code": exit_code, "processes_left": left,
        "tracebacks_in_log": sum("Traceback" in line for line in server.log),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
