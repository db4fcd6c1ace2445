"""Random draws: one uniform per row and draw, and inverse-CDF sampling.

A seeded row's uniforms come from a counter-based generator keyed by (seed, number of output
tokens so far, slot): they do not depend on what else is in the batch, on the device, or on
whether the request was preempted and recomputed (the output length is the same again).
Unseeded rows share the sampler's own generator.

Sampling a token from probabilities ``p`` with one uniform ``u`` is exact inverse-CDF sampling
(what torch.multinomial does for one draw), batched: the first index whose cumulative sum
exceeds ``u * sum(p)``. The cumulative sum runs in float64 so that tokens late in the
vocabulary keep their probability to ~1e-16.
"""

from __future__ import annotations

import random

import torch

SLOT_SAMPLE = 0       # the token draw
SLOT_XTC = 1          # XTC's per-step coin

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STEP_MUL = 0xD1B54A32D192ED03
_SLOT_MUL = 0xAEF17502108EF2D9


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection on 64-bit ints with good avalanche."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def seeded_uniform(seed: int, step: int, slot: int) -> float:
    """A uniform in [0, 1) determined only by (seed, step, slot)."""
    h = _mix64(((seed & _MASK) + _GOLDEN) & _MASK)
    h = _mix64(h ^ ((step * _STEP_MUL + slot * _SLOT_MUL + _GOLDEN) & _MASK))
    return (h >> 11) * (1.0 / (1 << 53))


class RowRandom:
    """Per-row uniforms for one sampler (the unseeded generator lives as long as the sampler)."""

    def __init__(self, seed: int | None = None):
        self._shared = random.Random(seed)

    def uniforms(self, rows, slot: int) -> list[float]:
        shared = self._shared.random
        return [seeded_uniform(row.params.seed, len(row.output_token_ids), slot)
                if row.params.seed is not None else shared() for row in rows]


def inverse_cdf(probs: torch.Tensor, uniforms: list[float]) -> torch.Tensor:
    """Sample one token per row of ``probs`` [R, V] (not necessarily normalised)."""
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)
    u = torch.tensor(uniforms, dtype=torch.float64).to(probs.device, non_blocking=True)
    target = (u * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp_max_(probs.shape[1] - 1)
