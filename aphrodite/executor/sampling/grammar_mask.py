"""Structured outputs in the sampler: the grammar's token mask, applied before every other
constraint and stage.

The engine core fills one int32 bitmask row per constrained request (llguidance's layout:
bit k of word w allows token 32w + k); the tokens a row's grammar forbids get -inf, so
logit_bias, penalties and every sampler compose with the grammar, never undo it. Columns past
the bitmask's width (a model vocabulary padded beyond the tokenizer's) are forbidden too.
"""

from __future__ import annotations

import numpy as np
import torch

from aphrodite.executor.sampling.context import put_rows, take_rows

NEG_INF = float("-inf")


def allowed_tokens(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool [rows, vocab_size]: True where the bitmask allows the token."""
    bitmask = np.ascontiguousarray(bitmask, dtype=np.int32)
    width = min(bitmask.shape[1] * 32, vocab_size)
    # The int32 words as little-endian bytes, each byte's bits low first: token order.
    words = bitmask.astype("<i4", copy=False).view(np.uint8)
    bits = np.unpackbits(words, axis=1, count=width, bitorder="little").view(bool)
    if width == vocab_size:
        return bits
    allowed = np.zeros((bitmask.shape[0], vocab_size), dtype=bool)
    allowed[:, :width] = bits
    return allowed


def allowed_tokens_on_device(bitmask: np.ndarray, vocab_size: int,
                             device: torch.device) -> torch.Tensor:
    """allowed_tokens, unpacked on ``device`` (a GPU gets the words, 1/32 of the bools)."""
    words = torch.from_numpy(np.ascontiguousarray(bitmask, dtype=np.int32)).to(device)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()
    width = min(bits.shape[1], vocab_size)
    if width == vocab_size:
        return bits[:, :vocab_size]
    allowed = torch.zeros((bits.shape[0], vocab_size), dtype=torch.bool, device=device)
    allowed[:, :width] = bits[:, :width]
    return allowed


def apply_grammar_mask(logits: torch.Tensor, rows: list[int], bitmask: np.ndarray) -> None:
    """In place: logits[rows[j], t] = -inf where bitmask row j forbids token t."""
    if not rows:
        return
    order = np.argsort(rows, kind="stable")          # take_rows wants batch order
    sorted_rows = [rows[j] for j in order]
    sub, index = take_rows(logits, sorted_rows)     # logits itself when all rows are masked
    if logits.device.type == "cpu":                  # numpy unpacks bytes fastest on CPUs
        forbid = torch.from_numpy(~allowed_tokens(bitmask[order], logits.shape[1]))
    else:
        forbid = ~allowed_tokens_on_device(bitmask[order], logits.shape[1], logits.device)
    # In place: a masked fill is a third of the time of a select into a new tensor.
    put_rows(logits, index, sub.masked_fill_(forbid, NEG_INF))
