"""Stages that reshape the distribution rather than cut its tail: quadratic smoothing, XTC
and skew.

Quadratic smoothing (kalomaze): with d = logit - max, logit <- max - k d^2 + s d^3 where
k = f (3 - c) / 2 and s = f (c - 1) / 2 (f = smoothing_factor, c = smoothing_curve).

XTC ("exclude top choices"): with probability xtc_probability per row and step, if at least
two tokens have p >= xtc_threshold, all of them except the least likely one are removed. The
coin comes from the row's own generator, so seeded rows stay reproducible.

Skew (after softmax): with the tokens sorted by descending probability,
cdf <- cdf ^ exp(skew) and the probabilities are the differences of the new cdf. Positive
skew moves mass towards less likely tokens, negative skew towards the top. Aphrodite 0.6
cumulated in *vocabulary* order, which made the effect depend on token ids; the idea comes
from exllamav2, whose candidates are sorted, so we sort.
"""

from __future__ import annotations

import torch

from aphrodite.executor.sampling.context import column, count_true, put_rows, take_rows
from aphrodite.executor.sampling.draw import SLOT_XTC
from aphrodite.executor.sampling.filters import descending_order

NEG_INF = float("-inf")


def apply_quadratic(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    factor = column(rows, "smoothing_factor", logits)
    curve = column(rows, "smoothing_curve", logits)
    k = factor * (3 - curve) / 2
    s = factor * (curve - 1) / 2
    top = logits.amax(-1, keepdim=True)
    d = logits - top
    smoothed = top + d.square() * (s * d - k)
    return torch.where(torch.isfinite(logits), smoothed, logits)   # -inf stays -inf


def apply_xtc(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    coins = ctx.random.uniforms(rows, SLOT_XTC)
    hit = [j for j, (row, u) in enumerate(zip(rows, coins)) if u < row.params.xtc_probability]
    if not hit:
        return logits
    sub, index = take_rows(logits, hit)
    probs = sub.softmax(-1)
    above = probs >= column([rows[j] for j in hit], "xtc_threshold", logits)
    enough = count_true(above) >= 2
    least_likely = torch.where(above, probs, float("inf")).argmin(-1, keepdim=True)
    remove = (above & enough).scatter_(1, least_likely, False)
    put_rows(logits, index, sub.masked_fill_(remove, NEG_INF))
    return logits


def apply_skew(probs: torch.Tensor, rows) -> torch.Tensor:
    """Skew rows of a probability tensor [R, V]; returns new (unnormalised) probabilities."""
    exponent = torch.exp(column(rows, "skew", probs))
    support = int(count_true(probs > 0).max())      # zero-probability tokens stay zero
    top_idx = descending_order(probs, support)
    top_probs = probs.gather(1, top_idx)
    cdf = top_probs.cumsum(-1).clamp_(0, 1).pow(exponent)
    skewed = cdf.clone()
    skewed[:, 1:] -= cdf[:, :-1]
    skewed.clamp_min_(0)
    return torch.zeros_like(probs).scatter_(1, top_idx, skewed)
