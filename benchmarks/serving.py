"""Serving benchmark: concurrent streaming clients against an OpenAI-compatible server.

    # against a running server
    python benchmarks/serving.py --base-url http://localhost:2242 --num-prompts 200 --concurrency 32
    # start our server here, benchmark it, stop it, then run the offline engine on the
    # same requests with the same engine options, and report server / offline throughput
    python benchmarks/serving.py --launch-server --offline \
        --engine-args "--max-model-len 1024 --kv-cache-memory 2GiB" --num-prompts 64

Requests are token-id prompts of --input-len random (seeded) ordinary tokens, sent to
/v1/completions with ignore_eos and max_tokens=--output-len, so every request produces
exactly the same amount of work on the server and offline. Reported per run: request
and token throughput; TTFT (first streamed token), TPOT ((latency - TTFT) / (tokens - 1)
per request), ITL (every gap between streamed chunks) and end-to-end latency, each as
mean / p50 / p99. The server and the offline engine run one after the other, never at
the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(vocab_size: int, special_ids: set[int], n: int, length: int,
                 seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    ordinary = [t for t in range(min(vocab_size, 32000)) if t not in special_ids]
    return [[rng.choice(ordinary) for _ in range(length)] for _ in range(n)]


async def one_request(session, url, model, prompt, output_len, headers) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    try:
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return result
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.error = repr(exc)
    return result


async def run_clients(base_url, model, prompts, output_len, concurrency, api_key):
    url = f"{base_url}/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)

    async def limited(session, prompt):
        async with limit:
            return await one_request(session, url, model, prompt, output_len, headers)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(session, p) for p in prompts))
        return results, time.perf_counter() - start


def summarise(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"mean": statistics.fmean(ordered), "p50": statistics.median(ordered), "p99": pick(0.99)}


def server_report(results: list[RequestResult], elapsed: float, input_len: int) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": elapsed,
        "request_throughput": len(ok) / elapsed,
        "output_throughput": output_tokens / elapsed,
        "total_token_throughput": (output_tokens + input_len * len(ok)) / elapsed,
        "ttft_ms": {k: v and v * 1e3 for k, v in summarise([r.ttft for r in ok]).items()},
        "tpot_ms": {k: v and v * 1e3 for k, v in summarise(tpot).items()},
        "itl_ms": {k: v and v * 1e3 for k, v in summarise([g for r in ok for g in r.itl]).items()},
        "e2e_ms": {k: v and v * 1e3 for k, v in summarise([r.latency for r in ok]).items()},
    }


def run_offline(engine_args: list[str], prompts, output_len) -> dict:
    from aphrodite import LLM, SamplingParams
    from aphrodite.frontend.args import parse_args

    config, _ = parse_args(engine_args)
    llm = LLM(**dataclasses.asdict(config))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                     SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)   # warm-up
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"duration_s": elapsed, "output_throughput": tokens / elapsed,
            "request_throughput": len(prompts) / elapsed}


class LaunchedServer:
    """`python -m aphrodite.server` on a free port for the duration of the benchmark."""

    def __init__(self, engine_args: list[str], log_path: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aphrodite.server", "--host", "127.0.0.1", "--port",
             str(self.port), "--disable-log-requests", *engine_args],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 900) -> None:
        import urllib.request
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def discover(base_url: str, api_key: str | None) -> tuple[str, int]:
    import urllib.request
    req = urllib.request.Request(f"{base_url}/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        card = json.load(r)["data"][0]
    return card["id"], card.get("max_model_len", 0)


def print_report(report: dict) -> None:
    s = report["server"]
    print(f"\n== server: {s['completed']} ok, {s['failed']} failed in {s['duration_s']:.1f} s "
          f"(concurrency {report['concurrency']}, in {report['input_len']} / out "
          f"{report['output_len']} tokens)")
    print(f"request throughput  {s['request_throughput']:.2f} req/s")
    print(f"output throughput   {s['output_throughput']:.1f} tokens/s")
    print(f"total throughput    {s['total_token_throughput']:.1f} tokens/s")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        v = s[name]
        if v["mean"] is not None:
            print(f"{name[:-3].upper():5} mean {v['mean']:9.1f} ms   p50 {v['p50']:9.1f} ms   "
                  f"p99 {v['p99']:9.1f} ms")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")
    if "offline" in report:
        o = report["offline"]
        print(f"\n== offline LLM: {o['output_throughput']:.1f} output tokens/s in "
              f"{o['duration_s']:.1f} s")
        print(f"server / offline output throughput: {report['server_offline_ratio']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://localhost:2242")
    ap.add_argument("--api-key", default=os.environ.get("APHRODITE_API_KEY"))
    ap.add_argument("--model", default=None, help="default: the server's first model")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--launch-server", action="store_true",
                    help="start `python -m aphrodite.server ENGINE_ARGS` here for the run")
    ap.add_argument("--offline", action="store_true",
                    help="then run aphrodite.LLM with ENGINE_ARGS on the same requests")
    ap.add_argument("--engine-args", default="",
                    help="server/engine options for --launch-server and --offline, one string")
    ap.add_argument("--server-log", default="benchmark-server.log")
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args()
    engine_args = shlex.split(args.engine_args)

    from aphrodite.model_files import load_tokenizer, resolve_model
    from aphrodite.frontend.args import parse_args
    config, _ = parse_args(engine_args)
    tokenizer = load_tokenizer(resolve_model(config.model), config.tokenizer)
    prompts = make_prompts(len(tokenizer), set(tokenizer.all_special_ids), args.num_prompts,
                           args.input_len, args.seed)

    server = LaunchedServer(engine_args, args.server_log) if args.launch_server else None
    try:
        base_url = server.base_url if server else args.base_url.rstrip("/")
        if server:
            server.wait_ready()
        model = args.model or discover(base_url, args.api_key)[0]
        asyncio.run(run_clients(base_url, model, prompts[:2], 4, 2, args.api_key))  # warm-up
        results, elapsed = asyncio.run(run_clients(base_url, model, prompts, args.output_len,
                                                   args.concurrency, args.api_key))
    finally:
        if server:
            server.stop()
    report = {"base_url": base_url, "model": model, "num_prompts": args.num_prompts,
              "concurrency": args.concurrency, "input_len": args.input_len,
              "output_len": args.output_len, "engine_args": engine_args,
              "server": server_report(results, elapsed, args.input_len)}
    if args.offline:
        report["offline"] = run_offline(engine_args, prompts, args.output_len)
        report["server_offline_ratio"] = (report["server"]["output_throughput"]
                                          / report["offline"]["output_throughput"])
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
