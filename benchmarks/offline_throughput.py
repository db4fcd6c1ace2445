"""Offline throughput: Aphrodite's engine vs transformers' generate, same prompts, same run.

    python benchmarks/offline_throughput.py --num-prompts 64 --dtype float32
    python benchmarks/offline_throughput.py --dtype bfloat16 --workload mixed

Workloads: "equal" (every request 128 new tokens) and "mixed" (16-512 new tokens, seeded),
both with ignore_eos so every run produces exactly the requested tokens. transformers runs
in groups of 32 (left-padded, each group until its longest output), which is how people
batch it by hand. Both sides use greedy decoding, the same dtype and the same thread count;
they run one after the other, never at the same time (the cores would be shared).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import time

TOPICS = ["a dragon", "the sea", "a lost key", "a robot chef", "winter", "a lighthouse",
          "an old map", "a city at night", "a talking cat", "the moon", "a storm",
          "a library", "a train journey", "a garden", "a clockmaker", "a desert"]


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        style = ["short story", "poem", "letter", "dialogue"][i // len(TOPICS) % 4]
        messages = [{"role": "user", "content": f"Write a {style} about {topic}."}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def output_lengths(workload: str, n: int, seed: int = 0) -> list[int]:
    if workload == "equal":
        return [128] * n
    rng = random.Random(seed)
    return [rng.randint(16, 512) for _ in range(n)]


def run_aphrodite(llm, prompts, lengths) -> float:
    from aphrodite import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in lengths]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    return elapsed


def run_transformers(model, tokenizer, prompts, lengths, group: int = 32) -> float:
    import torch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.device
    start = time.perf_counter()
    for g in range(0, len(prompts), group):
        batch, want = prompts[g:g + group], lengths[g:g + group]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                            device=device)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=max(want), min_new_tokens=max(want),
                           pad_token_id=pad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2 GGUF")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--group", type=int, default=32, help="transformers' batch size")
    ap.add_argument("--workload", default="both", choices=["equal", "mixed", "both"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--single-stream-tokens", type=int, default=128,
                    help="also time one request alone (0 to skip)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    from aphrodite import LLM
    from aphrodite.model_files import load_tokenizer, resolve_model
    files = resolve_model(args.model)
    tokenizer = load_tokenizer(files)
    prompts = make_prompts(tokenizer, args.num_prompts)
    workloads = ["equal", "mixed"] if args.workload == "both" else [args.workload]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.device == "cuda":
        import torch
        machine = torch.cuda.get_device_name()
    results = {"machine": machine, "dtype": args.dtype,
               "threads": args.threads, "num_prompts": args.num_prompts, "runs": {}}

    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads, device=args.device,
              max_num_seqs=max(64, args.num_prompts), max_num_batched_tokens=2048)
    run_aphrodite(llm, prompts[:4], [8] * 4)                         # warm-up
    for w in workloads:
        lengths = output_lengths(w, len(prompts))
        t = run_aphrodite(llm, prompts, lengths)
        results["runs"][w] = {"tokens": sum(lengths), "aphrodite_s": t}
    if args.single_stream_tokens:
        t = run_aphrodite(llm, prompts[:1], [args.single_stream_tokens])
        results["runs"]["single"] = {"tokens": args.single_stream_tokens, "aphrodite_s": t}
    llm.shutdown()
    del llm
    gc.collect()

    if not args.skip_transformers:
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(args.threads)
        kwargs = {"gguf_file": files.gguf_file} if files.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(
            files.path, dtype=getattr(torch, args.dtype), **kwargs).eval().to(args.device)
        run_transformers(model, tokenizer, prompts[:2], [8, 8])      # warm-up
        for w in workloads:
            lengths = output_lengths(w, len(prompts))
            results["runs"][w]["transformers_s"] = run_transformers(
                model, tokenizer, prompts, lengths, args.group)
        if args.single_stream_tokens:
            results["runs"]["single"]["transformers_s"] = run_transformers(
                model, tokenizer, prompts[:1], [args.single_stream_tokens], group=1)

    print(f"\n{results['machine']}, {args.dtype}, {args.threads} threads, "
          f"{args.num_prompts} prompts")
    print(f"{'workload':<10}{'tokens':>8}{'aphrodite tok/s':>18}{'transformers tok/s':>21}"
          f"{'ratio':>8}")
    for w, r in results["runs"].items():
        ours = r["tokens"] / r["aphrodite_s"]
        r["aphrodite_tok_s"] = ours
        line = f"{w:<10}{r['tokens']:>8}{ours:>18.1f}"
        if "transformers_s" in r:
            theirs = r["tokens"] / r["transformers_s"]
            r["transformers_tok_s"], r["ratio"] = theirs, ours / theirs
            line += f"{theirs:>21.1f}{ours / theirs:>7.2f}x"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
