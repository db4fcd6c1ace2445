"""Replay one serving workload's requests through the engine in one process, step by step.

    python benchmarks/engine_replay.py --workload mixed --concurrency 64

The same seeded requests as `serving.py` (workload, level, seed), all added at once, run
through the scheduler, KV-cache manager and model runner of `step_profile.py` (no HTTP, no
second process), and the time is split into the same phases, with the forward pass into
attention / linear / rest. It answers "where does this workload's time go", which a serving
run cannot: prefill steps and decode steps are reported apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict

import torch

from aphrodite.config import EngineConfig
from aphrodite.executor.model_runner import ModelRunner
from aphrodite.model_files import load_tokenizer, resolve_model
from serving_workloads import WordSource, default_specs, level_requests
from step_profile import ForwardTimers, Loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="mixed", choices=["fixed", "mixed", "shared-prefix", "long"])
    ap.add_argument("--concurrency", type=int, default=64, help="the serving level to replay")
    ap.add_argument("--requests", type=int, default=None, help="default: the concurrency")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16"])
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(resolve_model(None))
    spec = default_specs([args.concurrency])[args.workload]
    requests = level_requests(spec, WordSource(tokenizer), args.concurrency,
                              args.requests or args.concurrency, args.seed)
    prompts = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in requests]
    config = EngineConfig(num_threads=args.threads, kv_cache_dtype=args.kv_cache_dtype)
    runner = ModelRunner(config, "cpu")
    totals = {"prefill": defaultdict(float), "decode": defaultdict(float)}
    steps = {"prefill": 0, "decode": 0}
    with tempfile.TemporaryDirectory(prefix="aphrodite-replay-") as ipc_dir:
        loop = Loop(runner, config, ipc_dir)
        for i, (prompt, request) in enumerate(zip(prompts, requests)):
            loop.add(str(i), prompt, request.max_tokens)
        timers = ForwardTimers()
        timers.install()
        start = time.perf_counter()
        while loop.scheduler.has_unfinished():
            prefilling = any(r.num_computed_tokens < len(r.prompt_token_ids)
                             for r in (*loop.scheduler.waiting, *loop.scheduler.running))
            times = defaultdict(float)
            timers.seconds.clear()
            began = time.perf_counter()
            loop.step(times, timers)
            kind = "prefill" if prefilling else "decode"
            steps[kind] += 1
            totals[kind]["step"] += time.perf_counter() - began
            for name, value in (*times.items(), *timers.seconds.items()):
                totals[kind][name] += value
        elapsed = time.perf_counter() - start
        timers.uninstall()
        loop.close()

    output_tokens = sum(r.max_tokens for r in requests)
    print(f"{args.workload} c={args.concurrency}: {len(requests)} requests, "
          f"{sum(map(len, prompts))} prompt tokens, {output_tokens} output tokens in "
          f"{elapsed:.1f} s ({output_tokens / elapsed:.1f} output tok/s), {args.threads} threads, "
          f"KV cache {runner.kv_dtype}")
    phases = ["step", "forward", "attention", "linear", "logits", "sampling", "schedule",
              "inputs", "ipc", "output"]
    print(f"{'seconds':<12}" + "".join(f"{p:>10}" for p in phases))
    for kind in ("prefill", "decode"):
        label = f"{kind} ({steps[kind]})"
        print(f"{label:<12}" + "".join(f"{totals[kind][p]:>10.2f}" for p in phases))
    print("(prefill: steps while any prompt is still being computed; attention and linear are "
          "inside forward)")


if __name__ == "__main__":
    main()
