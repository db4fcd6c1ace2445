"""Repetition, frequency and presence penalties; no-repeat-ngram.

Repetition penalty covers the prompt and the output (a seen token's positive logit is divided
by it, a negative one multiplied). Frequency and presence penalties follow OpenAI's formula
over the output only: logit -= frequency * count + presence * (count > 0).

``repetition_penalty_range`` N > 0 narrows all three to the last N tokens of prompt + output,
as llama.cpp's penalty window does: a token is seen only if it occurs there, and frequency and
presence count its output occurrences inside the window.

No-repeat-ngram looks at prompt + output. (Aphrodite 0.6 passed only the padded prompt
tensor, so n-grams repeated from the generated text were never caught; we use both.)
"""

from __future__ import annotations

import numpy as np
import torch

from aphrodite.executor.sampling.constraints import mask_tokens
from aphrodite.executor.sampling.context import column, run_on_rows
from aphrodite.executor.sampling.history import padded, token_history


def uses_penalties(p) -> bool:
    return p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0


def apply_penalties(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    """Only the tokens in a row's history can change, so the math runs on [R, history]
    gathered values, not on [R, V]; output counts come from one scatter_add."""
    num_rows, vocab = logits.shape
    device = logits.device
    histories = [penalty_window(row) for row in rows]
    if not all(len(h) for h in histories):       # nothing to penalise in an empty history
        non_empty = [j for j, h in enumerate(histories) if len(h)]
        if non_empty:
            run_on_rows(apply_penalties, logits, non_empty, rows, ctx)
        return logits
    # Pad each history with one of its own tokens: the padding then recomputes (and writes
    # back) that token's value, which changes nothing.
    seen = padded_with_own_token(histories, device)
    values = logits.gather(1, seen)
    if any(row.params.repetition_penalty != 1 for row in rows):
        rep = column(rows, "repetition_penalty", logits)
        values = torch.where(values > 0, values / rep, values * rep)
    if any(row.params.frequency_penalty != 0 or row.params.presence_penalty != 0
           for row in rows):
        outputs = padded([h[max(0, len(h) - len(row.output_token_ids)):]
                          for h, row in zip(histories, rows)],
                         vocab, device)                 # padding counts into spare column
        counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=device)
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=logits.dtype))
        count = counts.gather(1, seen)
        values -= column(rows, "frequency_penalty", logits) * count
        values -= column(rows, "presence_penalty", logits) * (count > 0)
    return logits.scatter_(1, seen, values)


def penalty_window(row) -> np.ndarray:
    """The tokens the penalties look at: the last repetition_penalty_range of prompt +
    output, or all of them when it is 0."""
    history = token_history(row)
    last_n = row.params.repetition_penalty_range
    return history[-last_n:] if 0 < last_n < len(history) else history


def padded_with_own_token(histories: list[np.ndarray], device) -> torch.Tensor:
    width = max(len(h) for h in histories)
    out = np.empty((len(histories), width), dtype=np.int64)
    for i, h in enumerate(histories):
        out[i, :len(h)] = h
        out[i, len(h):] = h[0]
    return torch.from_numpy(out).to(device, non_blocking=True)


def ngram_bans(history: np.ndarray, n: int) -> np.ndarray:
    """Tokens that would complete an n-gram already present in ``history``."""
    if len(history) < n:
        return history[:0]
    # Windows history[s:s+n] whose first n-1 tokens are the last n-1 tokens: each prefix
    # token is only tested at the starts that matched so far.
    last_start = len(history) - n
    starts = np.arange(last_start + 1)
    for k, token in enumerate(history[last_start + 1:]):
        starts = starts[history[starts + k] == token]
    return np.unique(history[starts + n - 1])


def apply_no_repeat_ngram(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for i, row in enumerate(rows):
        banned = ngram_bans(token_history(row), row.params.no_repeat_ngram_size)
        banned = banned[banned < ctx.vocab_size].tolist()
        ban_rows.extend([i] * len(banned))
        ban_cols.extend(banned)
    if ban_rows:
        mask_tokens(logits, ban_rows, ban_cols)
    return logits
