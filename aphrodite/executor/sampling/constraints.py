"""Hard constraints applied before every sampler stage, to every row (greedy ones too).

Order (Aphrodite 0.6): logit_bias, then allowed_token_ids, then banned tokens and bad words
together with the min_tokens ban on EOS and stop_token_ids.

A row is never left without a token: if its constraints would mask every token that still
has a finite logit, that row keeps its logits unmasked for this step instead of producing
NaNs (e.g. allowed_token_ids=[eos] together with min_tokens > 0).
"""

from __future__ import annotations

import torch

from aphrodite.executor.sampling.context import put_rows, take_rows
from aphrodite.executor.sampling.history import token_history

NEG_INF = float("-inf")


def apply_constraints(logits: torch.Tensor, rows, eos_token_ids: list[int]) -> None:
    """In place on ``logits`` [B, V]."""
    _apply_logit_bias(logits, rows)
    _apply_allowed(logits, rows)
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for i, row in enumerate(rows):
        banned = banned_tokens(row, eos_token_ids)
        if banned:
            ban_rows.extend([i] * len(banned))
            ban_cols.extend(banned)
    if ban_rows:
        mask_tokens(logits, ban_rows, ban_cols)


def banned_tokens(row, eos_token_ids: list[int]) -> list[int]:
    """Tokens this row may not sample now: banned ids, bad words whose prefix was just
    generated, and EOS/stop ids while fewer than min_tokens tokens are out."""
    p = row.params
    banned = list(p.banned_token_ids)
    if p.bad_words_token_ids:
        history = token_history(row)
        for word in p.bad_words_token_ids:
            prefix = len(word) - 1
            if prefix == 0 or (len(history) >= prefix
                               and history[-prefix:].tolist() == word[:-1]):
                banned.append(word[-1])
    if p.min_tokens > len(row.output_token_ids):
        banned.extend(eos_token_ids)
        banned.extend(p.stop_token_ids)
    return banned


def mask_tokens(logits: torch.Tensor, rows: list[int], cols: list[int]) -> None:
    """Set logits[rows[j], cols[j]] = -inf, except in rows where that would leave no finite
    logit: those are restored."""
    device = logits.device
    r = torch.tensor(rows, device=device)
    c = torch.tensor(cols, device=device)
    saved = logits[r, c]
    logits[r, c] = NEG_INF
    touched = torch.unique(r)
    dead = touched[torch.isneginf(logits[touched].amax(-1))]
    if dead.numel():
        restore = torch.isin(r, dead)
        logits[r[restore], c[restore]] = saved[restore]


def _apply_logit_bias(logits: torch.Tensor, rows) -> None:
    r: list[int] = []
    c: list[int] = []
    v: list[float] = []
    for i, row in enumerate(rows):
        bias = row.params.logit_bias
        if bias:
            r.extend([i] * len(bias))
            c.extend(bias.keys())
            v.extend(bias.values())
    if r:
        device = logits.device
        logits.index_put_((torch.tensor(r, device=device), torch.tensor(c, device=device)),
                          torch.tensor(v, dtype=logits.dtype, device=device), accumulate=True)


def _apply_allowed(logits: torch.Tensor, rows) -> None:
    indices = [i for i, row in enumerate(rows) if row.params.allowed_token_ids is not None]
    if not indices:
        return
    device = logits.device
    sub, index = take_rows(logits, indices)
    keep = torch.zeros_like(sub, dtype=torch.bool)
    r = [j for j, i in enumerate(indices) for _ in rows[i].params.allowed_token_ids]
    c = [t for i in indices for t in rows[i].params.allowed_token_ids]
    keep[torch.tensor(r, device=device), torch.tensor(c, device=device)] = True
    masked = sub.masked_fill(~keep, NEG_INF)
    alive = ~torch.isneginf(masked.amax(-1, keepdim=True))
    put_rows(logits, index, torch.where(alive, masked, sub))
