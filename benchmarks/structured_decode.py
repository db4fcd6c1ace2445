"""What constrained decoding costs: a decode step at batch 64 with every row under its own JSON
schema, against the same batch unconstrained, on the default model; and how long the twenty
test schemas (tests/json_schemas.py) take to compile, first and from the cache.

    python benchmarks/structured_decode.py --batch 64 --tokens 48 --rounds 3

Both runs go through the whole engine (offline LLM: the engine-core process fills the masks
while the worker runs the forward pass, the worker applies them before sampling). A step's time
is the interval between consecutive STEP_OUTPUTS frames while every row decodes (steps with
prefill or with fewer rows are left out); each run reports the median step. The schemas are
built so that no row can finish within --tokens (arrays with minItems far above it), so the
batch stays whole. Rounds alternate unconstrained / constrained on the same warm engine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

ITEM_SHAPES = [
    {"type": "string", "maxLength": 8},
    {"type": "integer", "minimum": 0, "maximum": 999},
    {"enum": ["low", "medium", "high"]},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0}},
     "required": ["name", "age"]},
    {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
    {"type": "number", "minimum": -1, "maximum": 1},
    {"type": "boolean"},
    {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]},
]


def row_schema(i: int, min_items: int) -> dict:
    """A distinct schema per row (its own key and item shape), long enough not to finish."""
    return {"type": "object",
            "properties": {f"field_{i}": {"type": "array", "items": ITEM_SHAPES[i % len(ITEM_SHAPES)],
                                          "minItems": min_items}},
            "required": [f"field_{i}"], "additionalProperties": False}


def decode_step_times(llm, prompts, params) -> list[float]:
    """Intervals between STEP_OUTPUTS frames in which every row got a token and none prefilled."""
    stamps = []
    next_step = llm._next_step

    def recording():
        step = next_step()
        if step is not None:
            full = (step.stats.num_generation_tokens == len(prompts)
                    and step.stats.num_prompt_tokens == 0)
            stamps.append((step.timestamp, full))
        return step

    llm._next_step = recording
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm._next_step = next_step
    return [b[0] - a[0] for a, b in zip(stamps, stamps[1:]) if a[1] and b[1]]


def compile_times(tokenizer, vocab_size: int, eos_ids: list[int]) -> tuple[float, list[float], list[float]]:
    """Seconds through the engine core's GrammarManager: loading the tokenizer (the first
    structured request pays it), then per test schema a first compile and a cache hit."""
    import copy
    import tempfile

    from aphrodite.core.grammars import TOKENIZER_FILE, GrammarManager
    from json_schemas import SCHEMAS

    with tempfile.TemporaryDirectory() as session_dir:
        backend = copy.copy(tokenizer.backend_tokenizer)     # as EngineProcess.share_tokenizer
        backend.no_padding()
        backend.no_truncation()
        with open(os.path.join(session_dir, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(backend.to_str())
        manager = GrammarManager(session_dir, vocab_size, eos_ids)
        start = time.perf_counter()
        manager.submit({"regex": "[0-9]+"}).result()
        tokenizer_s = time.perf_counter() - start
        first, cached = [], []
        for times in (first, cached):
            for schema in SCHEMAS.values():
                start = time.perf_counter()
                manager.submit({"json": schema}).result()
                times.append(time.perf_counter() - start)
        manager.shutdown()
    return tokenizer_s, first, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per row and run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="worker torch threads")
    args = ap.parse_args()

    from aphrodite import LLM, SamplingParams
    from aphrodite.structured_outputs import StructuredOutputsParams

    cpu = platform.processor() or platform.machine()
    print(f"# structured_decode: batch {args.batch}, {args.tokens} tokens, {os.cpu_count()} CPUs "
          f"({cpu})")
    engine_args = {"num_threads": args.threads} if args.threads else {}
    with LLM(max_num_seqs=args.batch, **engine_args) as llm:
        prompts = [f"<|im_start|>user\nWrite record number {i} as JSON.<|im_end|>\n"
                   "<|im_start|>assistant\n" for i in range(args.batch)]
        free = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.tokens, ignore_eos=True)
                for i in range(args.batch)]
        constrained = [SamplingParams(
            temperature=1.0, seed=i, max_tokens=args.tokens, ignore_eos=True,
            structured_outputs=StructuredOutputsParams(json=row_schema(i, 4 * args.tokens)))
            for i in range(args.batch)]
        llm.generate(prompts, constrained, use_tqdm=False)     # warm up, and compile every schema
        runs: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        for _ in range(args.rounds):
            runs["unconstrained"] += decode_step_times(llm, prompts, free)
            runs["constrained"] += decode_step_times(llm, prompts, constrained)
        medians = {name: statistics.median(times) for name, times in runs.items()}
        for name, times in runs.items():
            print(f"{name:>14}: median step {medians[name] * 1e3:7.2f} ms over {len(times)} steps "
                  f"(min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f})")
        print(f"constrained / unconstrained step: {medians['constrained'] / medians['unconstrained']:.3f}x"
              " (target <= 1.10x)")
        tokenizer, vocab_size, eos_ids = llm.tokenizer, llm.vocab_size, llm.engine.ready.eos_token_ids
    # With the engine stopped, so that nothing else runs on the cores.
    tokenizer_s, first, cached = compile_times(tokenizer, vocab_size, eos_ids)
    print(f"grammar tokenizer load (first structured request): {tokenizer_s * 1e3:.0f} ms")
    print(f"compile, 20 test schemas: first {sum(first) * 1e3:.1f} ms in all "
          f"(max {max(first) * 1e3:.2f} ms), cached {sum(cached) * 1e3:.2f} ms in all "
          f"(max {max(cached) * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
