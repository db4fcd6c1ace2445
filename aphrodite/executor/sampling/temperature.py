"""Temperature and dynamic temperature.

Dynamic temperature (on when dynatemp_min or dynatemp_max is non-zero) replaces the static
temperature: T = min + (max - min) * (H / ln N) ** exponent, with H the entropy of the current
distribution and N the number of tokens with a finite logit (H / ln N is taken as 0 when
N <= 1). T is floored at 1e-5 so a zero dynamic temperature acts as greedy, not as a division
by zero.
"""

from __future__ import annotations

import torch

from aphrodite.executor.sampling.context import (column, count_true, in_play, put_rows,
                                                take_rows)
from aphrodite.sampling_params import GREEDY_TEMPERATURE


def uses_temperature(p) -> bool:
    return p.uses_dynatemp or p.temperature != 1.0


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row, [R, 1]; -inf logits contribute nothing."""
    # softmax, not logp.exp(): exp of -inf is slow on CPUs
    return -(logits.softmax(-1) * logits.log_softmax(-1)).nansum(-1, keepdim=True)


def apply_temperature(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    temperature = column(rows, "temperature", logits)
    dynamic = [j for j, row in enumerate(rows) if row.params.uses_dynatemp]
    if dynamic:
        dyn_rows = [rows[j] for j in dynamic]
        sub, index = take_rows(logits, dynamic)
        finite = count_true(in_play(sub)).to(logits.dtype)
        max_entropy = finite.log()
        normalised = torch.where(finite > 1, entropy(sub) / max_entropy.clamp_min(1e-30),
                                 torch.zeros_like(max_entropy)).clamp_(0, 1)
        low = column(dyn_rows, "dynatemp_min", logits)
        high = column(dyn_rows, "dynatemp_max", logits)
        exponent = column(dyn_rows, "dynatemp_exponent", logits)
        put_rows(temperature, index, low + (high - low) * normalised.pow(exponent))
    return logits.div_(temperature.clamp_min_(GREEDY_TEMPERATURE))
