"""Candidate compaction: once the filters leave few tokens in a row, the remaining stages and
the final draw only look at those.

A Part is a set of batch rows processed together. It starts as full-vocabulary logits
[R, V]. After a truncating stage, rows left with fewer than V / COMPACT_FRACTION tokens move
into a compact part: [R, W] logits of their surviving tokens plus the token id of each
column. Compact columns hold the surviving tokens in vocabulary order (then padding at -inf
with the spare id V), so the final draw walks the same tokens in the same order as it would
over the full row.
Stages that look tokens up by id (DRY, penalties, no-repeat-ngram) expand a compact part back
to [R, V] first; in the default order they all run before any filter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aphrodite.executor.sampling.context import count_true, take_rows

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
    alive = part.logits > NEG_INF
    sizes = count_true(alive).squeeze(1)
    small_mask = sizes + 2 <= vocab // COMPACT_FRACTION
    small = small_mask.nonzero().squeeze(1).tolist()
    if not small:
        return [part]
    sub, index = take_rows(part.logits, small)
    sizes = sizes[small_mask]
    # nonzero() lists each row's surviving tokens in vocabulary order; put them at columns
    # 0..count-1. Two spare -inf columns keep tail-free sampling's second differences as on
    # full rows; padding columns point at the spare token id `vocab`.
    row, col = (alive if index is None else alive[index]).nonzero(as_tuple=True)
    starts = sizes.cumsum(0) - sizes
    position = torch.arange(row.numel(), device=row.device) - starts[row]
    width = int(sizes.max()) + 2
    values = torch.full((len(small), width), NEG_INF, dtype=sub.dtype, device=sub.device)
    values[row, position] = sub[row, col]
    ids = torch.full((len(small), width), vocab, dtype=torch.long, device=sub.device)
    ids[row, position] = col
    parts = [Part(values, ids, [part.members[j] for j in small])]
    large = (~small_mask).nonzero().squeeze(1).tolist()
    if large:
        parts.append(Part(take_rows(part.logits, large)[0], None,
                          [part.members[j] for j in large]))
    return parts


def expand(part: Part, vocab: int) -> Part:
    """The same rows as full-vocabulary logits."""
    if part.ids is None:
        return part
    full = torch.full((part.logits.shape[0], vocab + 1), NEG_INF, dtype=part.logits.dtype,
                      device=part.logits.device)
    full.scatter_(1, part.ids, part.logits)       # padding lands in the spare last column
    return Part(full[:, :vocab], None, part.members)


def to_vocab(values: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """Per-column values (e.g. logprobs) of a possibly compact part as [R, V], -inf elsewhere."""
    if ids is None:
        return values
    return expand(Part(values, ids, []), vocab).logits
