"""Greedy outputs of the default model through the engine, saved, or compared across checkouts.

    python benchmarks/greedy_agreement.py save before.json     # in the old checkout
    python benchmarks/greedy_agreement.py save after.json      # in the new one
    python benchmarks/greedy_agreement.py compare before.json after.json

`--quantization none` runs the float32 model instead of the default GGUF path.

Two sets: quantized_decode.py's 4 chat prompts x 128 new tokens, and 16 of the mixed serving workload's prompts x
64 new tokens run as one batch (so batched decode, prefill chunks and the KV cache's paging
all take part). A kernel change that only reorders float32 sums should leave every sequence
identical; `compare` prints, per set, how many are, the mean fraction of positions before
the first difference, and the per-position match rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # aphrodite, when not installed


def generate(args) -> dict[str, list[list[int]]]:
    from aphrodite.llm import LLM
    from aphrodite.sampling_params import SamplingParams
    from quantized_decode import PROMPTS
    from serving_workloads import WordSource, default_specs, level_requests

    with LLM(kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization) as llm:
        greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        chats = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], greedy(128),
                         use_tqdm=False)
        requests = level_requests(default_specs([16])["mixed"], WordSource(llm.tokenizer), 16,
                                  16, seed=0)
        mixed = llm.generate([r.prompt for r in requests], greedy(64), use_tqdm=False)
    return {"chat": [list(r.outputs[0].token_ids) for r in chats],
            "mixed": [list(r.outputs[0].token_ids) for r in mixed]}


def compare(before: dict, after: dict) -> None:
    for name, old in before.items():
        new = after[name]
        prefixes, matches = [], []
        for a, b in zip(old, new):
            first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            prefixes.append(first_diff / len(a))
            matches.append(sum(x == y for x, y in zip(a, b)) / len(a))
        print(f"{name}: {sum(p == 1.0 for p in prefixes)} of {len(old)} sequences identical, "
              f"prefix agreement {sum(prefixes) / len(prefixes):.4f}, "
              f"per-position {sum(matches) / len(matches):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save")
    save.add_argument("path")
    save.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16"])
    save.add_argument("--quantization", default="auto", choices=["auto", "none", "int4"],
                      help="none: the float32 model; auto: the default GGUF path")
    both = sub.add_parser("compare")
    both.add_argument("before")
    both.add_argument("after")
    args = ap.parse_args()
    if args.command == "save":
        Path(args.path).write_text(json.dumps(generate(args)))
        print(f"saved {args.path}")
    else:
        compare(json.loads(Path(args.before).read_text()), json.loads(Path(args.after).read_text()))


if __name__ == "__main__":
    main()
