"""Plain data shared by the sampler stages: a row, the per-step context, sub-batch helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from aphrodite.executor.sampling.draw import RowRandom
from aphrodite.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence to sample a token for.

    ``state`` persists across steps for the same sequence (the runner keeps the same dict):
    mirostat's mu lives there, and the sampler caches the token history in it. Prompt and
    output token lists are only ever appended to."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    state: dict = field(default_factory=dict)


@dataclass
class StepContext:
    vocab_size: int
    random: RowRandom


StageFn = Callable[[torch.Tensor, list[SamplingRow], StepContext], torch.Tensor]


def column(rows: list[SamplingRow], name: str, like: torch.Tensor,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The parameter ``name`` of every row as an [R, 1] tensor on ``like``'s device."""
    values = [getattr(row.params, name) for row in rows]
    return torch.tensor(values, dtype=dtype).to(like.device, non_blocking=True).unsqueeze(1)


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries per row, [R, 1] int32 (torch's bool sum is slow on CPUs:
    numpy's count there, summing bytes elsewhere)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.count_nonzero(mask.numpy(), axis=-1)
                                .astype(np.int32)).unsqueeze(1)
    return mask.view(torch.uint8).sum(-1, keepdim=True, dtype=torch.int32)


def in_play(logits: torch.Tensor) -> torch.Tensor:
    """Mask of the tokens not removed (logit != -inf). (numpy compares several times faster
    than torch on CPUs.)"""
    if logits.device.type == "cpu":
        return torch.from_numpy(logits.numpy() != float("-inf"))
    return logits != float("-inf")


def remove(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set ``logits`` to -inf where ``mask`` holds, in place. (torch.where into the same
    tensor: about twice as fast as masked_fill_ on CPUs.)"""
    neg_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
    return torch.where(mask, neg_inf, logits, out=logits)


def remove_below(logits: torch.Tensor, key: torch.Tensor,
                 threshold: torch.Tensor) -> torch.Tensor:
    """Remove the tokens whose ``key`` [R, V] is < ``threshold`` [R, 1], in place."""
    if key.device.type == "cpu":
        return remove(logits, torch.from_numpy(key.numpy() < threshold.numpy()))
    return remove(logits, key < threshold)


def take_rows(t: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows ``indices`` of ``t`` and the index used: ``t`` itself (index None) when they
    are all its rows. (Advanced indexing, not index_select: the latter is much slower on
    CPUs when threads are contended.)"""
    if len(indices) == t.shape[0]:
        return t, None
    index = torch.tensor(indices, device=t.device)
    return t[index], index


def put_rows(t: torch.Tensor, index: torch.Tensor | None, rows: torch.Tensor) -> None:
    """Write back rows taken with take_rows."""
    if index is None:
        if rows is not t:
            t.copy_(rows)
    else:
        t.index_copy_(0, index, rows)


def run_on_rows(fn: StageFn, logits: torch.Tensor, indices: list[int],
                rows: list[SamplingRow], ctx: StepContext) -> None:
    """Apply ``fn`` to the rows ``indices`` of ``logits`` (in place): gather, operate, scatter."""
    sub, index = take_rows(logits, indices)
    put_rows(logits, index, fn(sub, [rows[i] for i in indices], ctx))
