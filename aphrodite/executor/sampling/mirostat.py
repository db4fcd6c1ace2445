"""Mirostat v2 (Basu et al. 2021), per request.

Each step: remove tokens whose surprise -log2 p exceeds mu (the most likely token always
stays), sample from what is left (renormalised), then mu <- mu - eta * (s - tau), where s is
the sampled token's surprise under the distribution it was drawn from (as in the paper's
reference code and llama.cpp). mu starts at 2 * tau and lives in ``row.state``.

It runs after all reorderable stages, just before the final softmax. Unlike Aphrodite's
V1 rebase, a mirostat request in the batch does not switch the samplers off for the others.
"""

from __future__ import annotations

import math

import torch

from aphrodite.executor.sampling.context import remove

MU_KEY = "mirostat_mu"


def uses_mirostat(p) -> bool:
    return p.mirostat_mode == 2


def current_mu(row) -> float:
    return row.state.get(MU_KEY, 2.0 * row.params.mirostat_tau)


def mirostat_truncate(logits: torch.Tensor, rows) -> torch.Tensor:
    mu = torch.tensor([current_mu(row) for row in rows], dtype=logits.dtype)
    surprise = logits.log_softmax(-1).div_(-math.log(2))
    too_surprising = surprise > mu.to(logits.device).unsqueeze(1)
    too_surprising.scatter_(1, logits.argmax(-1, keepdim=True), False)
    return remove(logits, too_surprising)


def mirostat_update(rows, sampled_probs: list[float]) -> None:
    """Move mu towards tau after sampling tokens with probabilities ``sampled_probs``."""
    for row, prob in zip(rows, sampled_probs):
        surprise = -math.log2(max(prob, 1e-45))
        p = row.params
        row.state[MU_KEY] = current_mu(row) - p.mirostat_eta * (surprise - p.mirostat_tau)
