"""Time per step of the sampler for a decode batch: plain greedy vs every stage on.

    python benchmarks/sampler_cost.py [--batch 64] [--vocab 49152] [--steps 20]
                                      [--decode-ms 85] [--device cpu|cuda] [--threads 2]

Each step samples one token per row and appends it to the row's output, as the model runner
does, so per-row caches behave as in serving. Rows carry ~500-token histories (prompt +
output); logits are synthetic but peaked like a language model's. With --decode-ms (a model
decode step measured elsewhere) the sampler's cost is also shown relative to it.
Configurations: greedy; a typical chat setting; every stage on (penalties, DRY,
no-repeat-ngram, all filters, smoothing, XTC, skew, logit_bias, bad words, logprobs; a third
of the rows with mirostat and a custom sampler order, a third seeded with dynatemp).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from aphrodite.executor.sampler import Sampler, SamplingRow
from aphrodite.sampling_params import SamplingParams

EVERY_STAGE = dict(
    repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1, dry_multiplier=0.8,
    dry_sequence_breaker_ids=[198, 42, 18, 26], no_repeat_ngram_size=4, temperature=0.9,
    nsigma=3.0, top_k=100, top_p=0.95, top_a=0.01, min_p=0.02, tfs=0.98, eta_cutoff=3.0,
    epsilon_cutoff=3.0, typical_p=0.98, smoothing_factor=0.2, xtc_probability=0.5,
    xtc_threshold=0.1, skew=0.3, logit_bias={10: 2.0, 11: -2.0}, bad_words_token_ids=[[5, 6]],
    logprobs=5)
CONFIGS = {
    "greedy": [dict(temperature=0.0)],
    "chat (T, top_p, min_p, rep_pen)": [dict(temperature=0.8, top_p=0.95, min_p=0.05,
                                             repetition_penalty=1.1)],
    "every stage on": [EVERY_STAGE,
                       dict(EVERY_STAGE, seed=1, dynatemp_min=0.5, dynatemp_max=1.2),
                       dict(EVERY_STAGE, mirostat_mode=2, sampler_priority=list(range(14)))],
}


def make_rows(settings: list[dict], batch: int, vocab: int, rng: random.Random):
    rows = []
    for i in range(batch):
        params = SamplingParams(**settings[i % len(settings)])
        prompt = [rng.randrange(vocab) for _ in range(400)]
        output = [rng.randrange(vocab) for _ in range(100)]
        rows.append(SamplingRow(params, prompt, output, {}))
    return rows


def model_like_logits(batch: int, vocab: int, device: str, gen: torch.Generator):
    """Peaked like a language model's: a few strong candidates over a long, low tail."""
    logits = torch.randn(batch, vocab, generator=gen) * 2.0
    top = torch.randint(0, vocab, (batch, 20), generator=gen)
    logits.scatter_add_(1, top, torch.rand(batch, 20, generator=gen) * 8 + 4)
    return logits.to(device)


def time_config(settings, args) -> float:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    rows = make_rows(settings, args.batch, args.vocab, rng)
    sampler = Sampler(eos_token_ids=[2], seed=0)
    logits = model_like_logits(args.batch, args.vocab, args.device, gen)
    times = []
    for step in range(args.steps + 3):
        step_logits = logits.clone()
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = sampler(step_logits, rows)           # returns host lists: includes the sync
        elapsed = time.perf_counter() - start
        if step >= 3:
            times.append(elapsed)
        for row, token in zip(rows, out.token_ids):
            row.output_token_ids.append(token)
    times.sort()
    return times[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--decode-ms", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"sampler cost, batch {args.batch}, vocab {args.vocab}, device {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    results = {name: time_config(settings, args) for name, settings in CONFIGS.items()}
    base = results["greedy"]
    for name, ms in results.items():
        line = f"  {name:34s} {ms:8.2f} ms/step  x{ms / base:5.1f} vs greedy"
        if args.decode_ms:
            line += f"  {100 * ms / args.decode_ms:6.1f}% of a {args.decode_ms:g} ms decode step"
        print(line)


if __name__ == "__main__":
    main()
