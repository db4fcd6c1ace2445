"""Candidate compaction: once the filters leave few tokens in a row, the remaining stages and
the final draw only look at those.

A Part is a set of batch rows processed together. It starts as full-vocabulary logits
[R, V]. After a truncating stage, rows left with fewer than V / COMPACT_FRACTION tokens move
into a compact part: [R, W] logits of their surviving tokens plus the token id of each
column. Compact columns hold the surviving tokens in vocabulary order (then padding at -inf
with the spare id V), so the final draw walks the same tokens in the same order as it would
over the full row.
Stages that look tokens up by id (DRY, penalties, no-repeat-ngram) see a compact part through
full-vocabulary logits and return to the same columns; in the default order they all run
before any filter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aphrodite.executor.sampling.context import count_true, in_play, take_rows

NEG_INF = float("-inf")
COMPACT_FRACTION = 4


@dataclass
class Part:
    logits: torch.Tensor            # [R, V], or [R, W] when compact
    ids: torch.Tensor | None        # [R, W] token id of each column; None: column = token id
    members: list[int]              # the batch rows, in tensor order


def split_compact(part: Part, vocab: int) -> list[Part]:
    """Split an uncompacted part into a compact part for its rows with few tokens left and a
    full part for the rest (either may be absent)."""
    alive = in_play(part.logits)
    sizes = count_true(alive).squeeze(1)
    small_mask = sizes + 2 <= vocab // COMPACT_FRACTION
    small = small_mask.nonzero().squeeze(1).tolist()
    if not small:
        return [part]
    # nonzero() lists each row's surviving tokens in vocabulary order; put them at columns
    # 0..count-1. Two spare -inf columns keep tail-free sampling's second differences as on
    # full rows; padding columns point at the spare token id `vocab`. (No copy of the small
    # rows: their entries are picked out of the whole tensor's nonzero().)
    row, col = _nonzero(alive)
    out_row = row
    if len(small) < len(part.members):
        picked = small_mask[row]
        row, col = row[picked], col[picked]
        out_row = (small_mask.cumsum(0) - 1)[row]
    sizes = sizes[small_mask]
    starts = sizes.cumsum(0) - sizes
    position = torch.arange(row.numel(), device=row.device) - starts[out_row]
    width = int(sizes.max()) + 2
    logits = part.logits
    values = torch.full((len(small), width), NEG_INF, dtype=logits.dtype, device=logits.device)
    values[out_row, position] = logits[row, col]
    ids = torch.full((len(small), width), vocab, dtype=torch.long, device=logits.device)
    ids[out_row, position] = col
    parts = [Part(values, ids, [part.members[j] for j in small])]
    large = (~small_mask).nonzero().squeeze(1).tolist()
    if large:
        parts.append(Part(take_rows(logits, large)[0], None, [part.members[j] for j in large]))
    return parts


def _nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the True entries of ``mask``, row by row (numpy's flat nonzero is
    about ten times faster than torch's nonzero on CPUs)."""
    if mask.device.type != "cpu":
        return mask.nonzero(as_tuple=True)
    row, col = np.divmod(np.flatnonzero(mask.numpy()), mask.shape[1])
    return torch.from_numpy(row), torch.from_numpy(col)


def run_by_token_id(part: Part, vocab: int, apply) -> Part:
    """Run ``apply(full_logits)`` (in place, on [R, V]) for a stage that looks tokens up by
    id; a compact part goes through full-vocabulary logits and back to the same columns.
    (Such stages only penalise or remove tokens: a token outside the compact set stays at
    -inf, so the part stays compact.)"""
    if part.ids is None:
        apply(part.logits)
        return part
    full = _scatter_full(part.logits, part.ids, vocab)
    apply(full[:, :vocab])
    return Part(full.gather(1, part.ids), part.ids, part.members)


def _scatter_full(values: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, V + 1]: ``values`` at their token ids, -inf elsewhere (padding lands in the spare
    last column)."""
    full = torch.full((values.shape[0], vocab + 1), NEG_INF, dtype=values.dtype,
                      device=values.device)
    return full.scatter_(1, ids, values)


def to_vocab(values: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """Per-column values (e.g. logprobs) of a possibly compact part as [R, V], -inf elsewhere."""
    if ids is None:
        return values
    return _scatter_full(values, ids, vocab)[:, :vocab]
