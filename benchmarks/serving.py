"""Serving benchmark: our server against baselines, same prompts, same run, one at a time.

    # default: launch our server, then transformers (batched, then sequential), each in turn
    python benchmarks/serving.py --json serving.json
    # add llama.cpp's OpenAI server on the same GGUF (launched here, only during its turn)
    python benchmarks/serving.py --baseline-name llama.cpp \
        --baseline-cmd "python -m llama_cpp.server --model {gguf} --host 127.0.0.1 \\
                        --port {port} --n_threads {threads} --n_ctx 8192"
    # a server that is already running (we cannot stop it: make sure it is idle meanwhile)
    python benchmarks/serving.py --baseline-url http://127.0.0.1:8080

Workloads (see serving_workloads.py): fixed, mixed, shared-prefix (our server with prefix
caching on and off) and long by default; prompt512 (one stream: TTFT and decode tok/s) on
request. Each (workload, concurrency) run sends the same seeded requests to every backend
through the same closed-loop streaming client; backends run one after the other and each
launched server is stopped before the next starts, after its processes' RSS (now and peak)
is read. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving_client import Endpoint, run_level  # noqa: E402
from serving_launch import Launched, free_port  # noqa: E402
from serving_report import (load_average, machine_description, print_memory,  # noqa: E402
                            print_table)
from serving_workloads import (WordSource, default_specs, level_requests,  # noqa: E402
                               warmup_requests)

OURS = "aphrodite"
OURS_NO_PREFIX = "aphrodite-no-prefix-cache"
OURS_KV16 = "aphrodite-kv-float16"
OUR_VARIANTS = {OURS, OURS_NO_PREFIX, OURS_KV16}


@dataclass
class Backend:
    name: str
    argv: list[str] | None = None        # launched here; None = already running at url
    url: str | None = None
    port: int = 0
    workloads: set[str] | None = None    # None = every workload
    levels: set[int] | None = None       # None = every level of the workload
    extra_body: dict = field(default_factory=dict)


def model_name(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(f"{base_url}/v1/models", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def build_backends(args, gguf: str | None) -> list[Backend]:
    engine = shlex.split(args.engine_args)
    backends = []

    def ours(name, extra, workloads=None):
        port = free_port()
        argv = [sys.executable, "-m", "aphrodite.server", "--host", "127.0.0.1", "--port",
                str(port), "--disable-log-requests", *engine, *extra]
        return Backend(name, argv, port=port, workloads=workloads)

    wanted = set(args.backends.split(","))
    if OURS in wanted:
        backends.append(Backend(OURS, url=args.base_url.rstrip("/")) if args.base_url
                        else ours(OURS, ["--enable-prefix-caching"]))
    if OURS_NO_PREFIX in wanted and not args.base_url:
        backends.append(ours(OURS_NO_PREFIX, ["--no-enable-prefix-caching"], {"shared-prefix"}))
    if OURS_KV16 in wanted and not args.base_url:
        backends.append(ours(OURS_KV16, ["--enable-prefix-caching", "--kv-cache-dtype", "float16"]))
    for name, batch in (("hf-batched", args.hf_max_batch), ("hf-sequential", 1)):
        if name in wanted:
            port = free_port()
            argv = [sys.executable, str(REPO / "benchmarks" / "baseline_server.py"), "--port",
                    str(port), "--max-batch", str(batch), "--dtype", args.hf_dtype,
                    "--threads", str(args.threads)] + (["--model", args.model] if args.model
                                                       else [])
            levels = set(args.sequential_levels) if name == "hf-sequential" else None
            backends.append(Backend(name, argv, port=port, levels=levels))
    extra = json.loads(args.baseline_body) if args.baseline_body else {}
    if args.baseline_cmd:
        port = free_port()
        cmd = args.baseline_cmd.format(port=port, gguf=gguf or "", threads=args.threads)
        backends.append(Backend(args.baseline_name, shlex.split(cmd), port=port,
                                extra_body=extra))
    elif args.baseline_url:
        backends.append(Backend(args.baseline_name, url=args.baseline_url.rstrip("/"),
                                extra_body=extra))
    return backends


def run_backend(backend: Backend, plan: list[tuple], args) -> tuple[list[dict], dict | None]:
    """Every (workload, level) this backend takes part in; its server is up only meanwhile.
    Also, for a launched server, its seconds to ready and its processes' memory just before
    it is stopped (see serving_launch.py)."""
    todo = [(spec, c, reqs) for spec, c, reqs in plan
            if (backend.workloads is None or spec.name in backend.workloads)
            and (backend.levels is None or c in backend.levels)]
    if not todo:
        return [], None
    server, info = None, None
    if backend.argv:
        server = Launched(backend.argv, backend.port, f"{args.log_prefix}-{backend.name}.log")
    runs = []
    try:
        if server:
            t0 = time.perf_counter()
            server.wait_ready(args.start_timeout)
            info = {"ready_s": time.perf_counter() - t0}
            print(f"[{backend.name}] ready in {info['ready_s']:.1f} s", flush=True)
        url = server.base_url if server else backend.url
        ep = Endpoint(url, args.served_model or model_name(url, args.api_key), args.api_key,
                      backend.extra_body)
        run_level(ep, args.warmup, 2, args.request_timeout)
        for spec, c, reqs in todo:
            load = load_average()
            stats = run_level(ep, reqs, c, args.request_timeout)
            runs.append({"workload": spec.name, "concurrency": c, "backend": backend.name,
                         "load_before": load, "stats": stats})
            print(f"[{backend.name}] {spec.name} c={c}: {stats['output_tok_s']:.1f} tok/s, "
                  f"{stats['errors']} errors, load {load}", flush=True)
    finally:
        if server:
            info = {**(info or {}), "memory": server.memory()}
            server.stop()
    return runs, info


def compare(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """Ratios of our throughput (default options, and float16 KV cache when run) to each
    baseline's, per (workload, level)."""
    by_key = {(r["workload"], r["concurrency"], r["backend"]): r for r in runs}
    comparisons, notes = [], []
    for r in runs:
        if r["backend"] not in (OURS, OURS_KV16):
            continue
        w, c = r["workload"], r["concurrency"]
        ours = r["stats"]["output_tok_s"]
        row = {"workload": w, "concurrency": c, "backend": r["backend"], "ours_tok_s": ours,
               "ratios": {}, "ttft_p50_ms": r["stats"]["ttft_ms"]["p50"]}
        for other in {x["backend"] for x in runs} - OUR_VARIANTS:
            base, same = by_key.get((w, c, other)), True
            if base is None and other == "hf-sequential":
                # One request at a time: its throughput does not grow with concurrency.
                base, same = by_key.get((w, 1, other)), False
            if base and base["stats"]["output_tok_s"]:
                row["ratios"][other] = {"ratio": ours / base["stats"]["output_tok_s"],
                                        "same_prompts": same, **latency_ratios(r, base)}
                if base is by_key.get((w, c, other)) and r["backend"] == OURS:
                    base["ours_over_this"] = row["ratios"][other]["ratio"]
        off = by_key.get((w, c, OURS_NO_PREFIX))
        if off and r["backend"] == OURS and off["stats"]["ttft_ms"]["p50"] and row["ttft_p50_ms"]:
            row["prefix_cache_ttft_speedup"] = off["stats"]["ttft_ms"]["p50"] / row["ttft_p50_ms"]
        comparisons.append(row)
    if any(not v["same_prompts"] for row in comparisons for v in row["ratios"].values()):
        notes.append("hf-sequential ratios marked * use its concurrency-1 run (a one-at-a-time "
                     "server's throughput does not depend on concurrency); run it at every "
                     "level with --sequential-levels 1,16,64")
    return comparisons, notes


def latency_ratios(ours: dict, base: dict) -> dict:
    """Single-stream figures, where both runs have them: the baseline's TTFT p50 over ours
    and our decode tok/s p50 over the baseline's (above 1: ours is faster on each)."""
    out = {}
    a, b = ours["stats"], base["stats"]
    if a["ttft_ms"]["p50"] and b["ttft_ms"]["p50"]:
        out["ttft_ratio"] = b["ttft_ms"]["p50"] / a["ttft_ms"]["p50"]
    if a["decode_tok_s"]["p50"] and b["decode_tok_s"]["p50"]:
        out["decode_ratio"] = a["decode_tok_s"]["p50"] / b["decode_tok_s"]["p50"]
    return out


def compare_memory(servers: dict) -> dict:
    """Our model process's peak RSS over each launched baseline's (below 1: ours is smaller)."""
    peak = lambda name: servers[name]["memory"]["model"].get("peak_mib")
    ours = peak(OURS) if OURS in servers else None
    return {name: ours / peak(name) for name in servers
            if ours and name not in OUR_VARIANTS and peak(name)}


def print_comparisons(comparisons: list[dict]) -> None:
    print("\nour output tok/s over each baseline's (same workload and concurrency):")
    for row in comparisons:
        parts = [f"{name} {v['ratio']:.2f}x{'' if v['same_prompts'] else '*'}"
                 for name, v in sorted(row["ratios"].items())]
        if row["concurrency"] == 1:
            parts += [f"{name} TTFT {v['ttft_ratio']:.2f}x, decode {v['decode_ratio']:.2f}x"
                      for name, v in sorted(row["ratios"].items())
                      if v["same_prompts"] and "ttft_ratio" in v and "decode_ratio" in v]
        if "prefix_cache_ttft_speedup" in row:
            parts.append(f"TTFT p50 prefix cache off/on {row['prefix_cache_ttft_speedup']:.2f}x")
        print(f"  {row['backend']:<21} {row['workload']:<14} c={row['concurrency']:<3} "
              f"{row['ours_tok_s']:8.1f} tok/s  "
              + ", ".join(parts))


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--workloads", default="fixed,mixed,shared-prefix,long",
                    help="comma-separated; prompt512 (single-stream TTFT and decode) is extra")
    ap.add_argument("--levels", type=int_list, default=[1, 16, 64],
                    help="concurrency levels (shared-prefix caps them at 16, long at 8)")
    ap.add_argument("--min-requests", type=int, default=8,
                    help="requests per run: max(this, concurrency x --requests-per-client)")
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--backends", default=f"{OURS},{OURS_NO_PREFIX},hf-batched,hf-sequential")
    ap.add_argument("--sequential-levels", type=int_list, default=[1],
                    help="levels at which hf-sequential runs (others reuse its level-1 figure)")
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2 GGUF")
    ap.add_argument("--engine-args", default="", help="extra options for our server, one string")
    ap.add_argument("--base-url", default=None,
                    help="benchmark our server already running here instead of launching one")
    ap.add_argument("--api-key", default=os.environ.get("APHRODITE_API_KEY"))
    ap.add_argument("--served-model", default=None, help="default: each server's first model")
    ap.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hf-max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="threads for the transformers and --baseline-cmd servers")
    ap.add_argument("--baseline-url", default=None, help="any OpenAI-compatible server")
    ap.add_argument("--baseline-cmd", default=None,
                    help="command that starts an OpenAI-compatible server; {port}, {gguf} and "
                         "{threads} are filled in")
    ap.add_argument("--baseline-name", default="baseline")
    ap.add_argument("--baseline-body", default=None,
                    help="extra JSON for the baseline's requests, "
                         "e.g. '{\"logit_bias\": {\"2\": -100}}'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=1800)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--log-prefix", default=os.path.join(tempfile.gettempdir(), "serving-bench"),
                    help="each launched server logs to PREFIX-BACKEND.log")
    ap.add_argument("--json", help="write the report here too")
    ap.add_argument("--length-scale", type=float, default=1.0,
                    help="scale every prompt and output length (e.g. 0.1 for a quick check)")
    args = ap.parse_args()
    # `timeout` and schedulers send SIGTERM: unwind so launched servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.model:
        args.engine_args = f"--model {shlex.quote(args.model)} {args.engine_args}"

    from aphrodite.model_files import load_tokenizer, resolve_model
    files = resolve_model(args.model)
    words = WordSource(load_tokenizer(files))
    specs = default_specs(args.levels, args.length_scale)
    unknown = set(args.workloads.split(",")) - set(specs)
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}; choose from {sorted(specs)}")
    plan = []
    for name in args.workloads.split(","):
        spec = specs[name]
        for c in spec.levels:
            n = max(args.min_requests, c * args.requests_per_client)
            plan.append((spec, c, level_requests(spec, words, c, n, args.seed)))
    args.warmup = warmup_requests(words, args.seed)

    report = {"machine": machine_description(), "threads": args.threads,
              "dtype": f"ours: {args.engine_args or 'defaults'}; transformers {args.hf_dtype}",
              "model": files.name, "seed": args.seed, "argv": sys.argv[1:],
              "workloads": {spec.name: {"about": spec.about, "levels": spec.levels}
                            for spec, _, _ in plan},
              "runs": [], "comparisons": [], "notes": [], "servers": {}}
    gguf = os.path.join(files.path, files.gguf_file) if files.gguf_file else None
    started = time.perf_counter()
    for backend in build_backends(args, gguf):
        runs, info = run_backend(backend, plan, args)
        report["runs"] += runs
        if info:
            report["servers"][backend.name] = info
            report["memory_ratios"] = compare_memory(report["servers"])
        report["comparisons"], report["notes"] = compare(report["runs"])
        report["wall_s"] = time.perf_counter() - started
        if args.json:            # after every backend, so an interrupted run keeps its data
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    print_table(report)
    print_memory(report)
    print_comparisons(report["comparisons"])


if __name__ == "__main__":
    main()
