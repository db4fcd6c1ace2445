"""DRY ("Don't Repeat Yourself"): penalise the token that would extend a repeat.

History h = prompt + output (only the last dry_range tokens when dry_range > 0). If the last
token is a sequence breaker nothing happens. Otherwise, for every earlier occurrence j of the
last token, L(j) is the length of the longest common suffix of h[:j+1] and h (it includes the
last token itself), never crossing a breaker. The token that followed the occurrence,
h[j+1], gets ``logit -= multiplier * base ** (L - allowed_length)`` for its longest L, when
L >= allowed_length. Breakers are never penalised (they end the repeat anyway), as in
Aphrodite 0.6.

Matching is vectorised over all occurrences and walks back one position at a time while any
occurrence still matches. It stops once the penalty passes SATURATION (1e4 logits): beyond
that the token's probability is exactly 0 in float32, so longer matches change nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from aphrodite.executor.sampling.history import token_history

SATURATION = 1e4


def dry_penalties(history: np.ndarray, p, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, penalties) for one row."""
    none = (np.empty(0, dtype=np.int64), np.empty(0))
    h = history[-p.dry_range:] if p.dry_range > 0 else history
    n = len(h)
    if n < 2:
        return none
    breakers = np.asarray(p.dry_sequence_breaker_ids, dtype=np.int64)
    last = h[-1]
    ends = np.flatnonzero(h[:-1] == last)               # earlier occurrences of the last token
    if ends.size == 0 or last in breakers:
        return none
    # A match cannot cross a breaker, so it is at most the breaker-free tail of h.
    breaks = np.flatnonzero(np.isin(h, breakers)) if breakers.size else breakers
    max_len = min(n - 1 - int(breaks[-1]) if breaks.size else n,
                  _saturation_length(p.dry_multiplier, p.dry_base, p.dry_allowed_length))
    if max_len < p.dry_allowed_length:
        return none

    lengths = np.ones(ends.size, dtype=np.int64)
    active = np.arange(ends.size)
    for k in range(1, max_len):
        pos = ends[active] - k
        active = active[pos >= 0]
        active = active[h[ends[active] - k] == h[n - 1 - k]]
        if active.size == 0:
            break
        lengths[active] += 1

    following = h[ends + 1]
    keep = (lengths >= p.dry_allowed_length) & (following < vocab_size)
    if breakers.size:
        keep &= ~np.isin(following, breakers)
    tokens, lengths = following[keep], lengths[keep]
    if tokens.size == 0:
        return none
    # Longest match per token: sort by (token, length) and take each token's last entry.
    order = np.lexsort((lengths, tokens))
    tokens, lengths = tokens[order], lengths[order]
    last_of_token = np.append(tokens[1:] != tokens[:-1], True)
    tokens, lengths = tokens[last_of_token], lengths[last_of_token]
    penalties = p.dry_multiplier * np.power(float(p.dry_base),
                                            (lengths - p.dry_allowed_length).astype(np.float64))
    return tokens, penalties


def _saturation_length(multiplier: float, base: float, allowed: int) -> int:
    """Shortest match length whose penalty exceeds SATURATION (longer ones change nothing)."""
    if base <= 1 or multiplier >= SATURATION:
        return max(allowed, 1)
    return allowed + math.ceil(math.log(SATURATION / multiplier) / math.log(base))


def apply_dry(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    r: list[int] = []
    c: list[np.ndarray] = []
    v: list[np.ndarray] = []
    for i, row in enumerate(rows):
        tokens, penalties = dry_penalties(token_history(row), row.params, ctx.vocab_size)
        if tokens.size:
            r.extend([i] * tokens.size)
            c.append(tokens)
            v.append(penalties)
    if r:
        device = logits.device
        logits.index_put_(
            (torch.tensor(r, device=device), torch.from_numpy(np.concatenate(c)).to(device)),
            torch.from_numpy(-np.concatenate(v)).to(device, logits.dtype), accumulate=True)
    return logits
