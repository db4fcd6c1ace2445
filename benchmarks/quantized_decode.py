"""Single-stream greedy decode: weight-only int4 (GGUF Q4 kept quantised) vs dequantised float32.

Runs the default model (or --model GGUF) directly, without the server, over 4 chat prompts,
and reports decode tokens/s for each mode and the greedy token agreement between them: the
fraction of the 128 generated positions (per prompt) before the first differing token, and
the plain per-position match rate.

    python benchmarks/quantized_decode.py [--model file.gguf] [--tokens 128] [--threads 2]
                                          [--kv-cache-dtype float16]

--kv-cache-dtype float16 adds a third run, int4 weights over a float16 KV cache, compared
with the same float32 reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # aphrodite, when not installed
from aphrodite.config import EngineConfig
from aphrodite.executor.layers.attention import (AttentionConfig, AttentionMetadata,
                                                 allocate_kv_caches)
from aphrodite.executor.models import get_model_class
from aphrodite.executor.loader import load_model_weights
from aphrodite.model_files import load_config, load_tokenizer, resolve_model

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain what a hash table is to a beginner.",
    "List three tips for staying focused while studying.",
]
BLOCK = 16


def load_model(model: str | None, quantization: str):
    files = resolve_model(model)
    config = load_config(files)
    net = get_model_class(config)(config, torch.float32)
    load_model_weights(net, files, EngineConfig(model=model, quantization=quantization), "cpu",
                       progress=False)
    return net.eval()


@torch.inference_mode()
def greedy(model, prompt: list[int], steps: int,
           cache_dtype: torch.dtype = torch.float32) -> tuple[list[int], float]:
    """Greedy tokens after `prompt` and the seconds spent in the decode steps (prefill excluded)."""
    blocks = -(-(len(prompt) + steps) // BLOCK)
    caches = allocate_kv_caches(model.config.num_hidden_layers, blocks, BLOCK, model.num_kv_heads,
                                model.head_dim, cache_dtype, "cpu")
    table = np.arange(blocks)[None, :]
    tokens, out = list(prompt), []
    start_decode = None
    for step in range(steps):
        begin = len(prompt) if step == 0 else len(tokens) - 1
        new = tokens[0 if step == 0 else begin:]
        positions = np.arange(len(tokens) - len(new), len(tokens))
        meta = AttentionMetadata.build(np.array([len(new)]), np.array([len(tokens)]), table,
                                       positions, AttentionConfig.for_cache(
                                           caches[0], model.config.num_attention_heads,
                                           model.dtype))
        hidden = model(torch.tensor(new), torch.from_numpy(positions), caches, meta)
        token = int(model.compute_logits(hidden[-1:]).argmax(-1))
        if step == 0:
            start_decode = time.perf_counter()
        tokens.append(token)
        out.append(token)
    return out, time.perf_counter() - start_decode


def chat_prompts(model: str | None) -> list[list[int]]:
    tokenizer = load_tokenizer(resolve_model(model))
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                          add_generation_prompt=True, return_dict=False)
            for p in PROMPTS]


def agreement(a: list[int], b: list[int]) -> tuple[float, float]:
    """(share of positions before the first difference, share of equal positions)."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return prefix / len(a), sum(x == y for x, y in zip(a, b)) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = chat_prompts(args.model)
    runs_wanted = [("none", torch.float32), ("int4", torch.float32)]
    if args.kv_cache_dtype == "float16":
        runs_wanted.append(("int4", torch.float16))
    results = {}
    for mode, cache_dtype in runs_wanted:
        name = mode if cache_dtype == torch.float32 else f"{mode}-kv-float16"
        model = load_model(args.model, mode)
        greedy(model, prompts[0], 4, cache_dtype)   # warm-up
        runs = [greedy(model, p, args.tokens, cache_dtype) for p in prompts]
        seconds = sum(s for _, s in runs)
        results[name] = {"tokens": [t for t, _ in runs],
                         "decode_tok_s": len(prompts) * (args.tokens - 1) / seconds}
        print(f"{name}: {results[name]['decode_tok_s']:.1f} decode tok/s", flush=True)
    summary = {"threads": torch.get_num_threads(),
               "fp32_tok_s": round(results["none"]["decode_tok_s"], 2)}
    for name in results.keys() - {"none"}:
        scores = [agreement(a, b) for a, b in zip(results["none"]["tokens"],
                                                  results[name]["tokens"])]
        summary[name] = {
            "tok_s": round(results[name]["decode_tok_s"], 2),
            "speedup": round(results[name]["decode_tok_s"] / results["none"]["decode_tok_s"], 3),
            "prefix_agreement": [round(p, 3) for p, _ in scores],
            "position_agreement": [round(m, 3) for _, m in scores]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
