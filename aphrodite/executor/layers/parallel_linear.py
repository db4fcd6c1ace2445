"""Tensor-parallel linear layers, loaded from full checkpoint matrices.

ColumnParallelLinear splits W's output rows across ranks and may stack several checkpoint
matrices (q, k and v; gate and up), each split on its own, so that one product serves them
all. RowParallelLinear splits W's input columns: each rank multiplies its share of x's
columns, an all-reduce sums the partial products, and the bias is added once, after it.

A matrix may arrive as QuantizedParts (GGUF blocks kept quantised, single rank): a stacked
one becomes one QuantizedWeight once all its parts are in. Products go through
linear.linear, a module attribute, so that benchmarks/step_profile.py can time them.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch
from torch import nn

from aphrodite.executor.layers import linear
from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.executor.layers.weights import (copy_into, empty_param, load_matrix,
                                               replace_parameter, shard)

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def torch_all_reduce(x: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(x)
    return x


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, part_rows: dict[str, int], bias: bool,
                 dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1):
        """part_rows: the stacked matrices' names and rows on this rank, in order."""
        super().__init__()
        self.part_rows = part_rows
        self._row_starts = dict(zip(part_rows, accumulate(part_rows.values(), initial=0)))
        self.tp_rank, self.tp_size = tp_rank, tp_size
        rows = sum(part_rows.values())
        self.weight = empty_param(rows, in_features, dtype=dtype)
        self.bias = empty_param(rows, dtype=dtype) if bias else None
        self._quantized: dict[str, QuantizedParts] = {}   # parts waiting for the others

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear.linear(x, self.weight, self.bias)

    def load(self, kind: str, value: torch.Tensor | QuantizedParts, part: str) -> str:
        """Part `part` of the weight or bias, from the full checkpoint tensor; returns the
        slot filled, "<kind>.<part>"."""
        if part not in self.part_rows:
            raise ValueError(f"unexpected part {part!r} (stacked: {', '.join(self.part_rows)})")
        slot = f"{kind}.{part}"
        if isinstance(value, QuantizedParts):
            self._quantized[part] = value
            if len(self._quantized) == len(self.part_rows):
                stacked = [self._quantized.pop(p) for p in self.part_rows]
                load_matrix(self, "weight", stacked)
            return slot
        param = self.weight if kind == "weight" else self.bias
        value = shard(value, 0, self.part_rows[part], self.tp_rank, self.tp_size)
        return copy_into(slot, param, value, self._row_starts[part])

    def finish_loading(self) -> None:
        """Parts that came quantised while others of the same weight did not are dequantised
        into place; then the weight takes the format its kernel wants."""
        for part, parts in list(self._quantized.items()):
            self.load("weight", torch.from_numpy(parts.dequantize()), part)
        self._quantized.clear()
        _prepare(self)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 tp_rank: int = 0, tp_size: int = 1, all_reduce: AllReduce = torch_all_reduce):
        """in_features: this rank's share of the columns."""
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.all_reduce = all_reduce
        self.weight = empty_param(out_features, in_features, dtype=dtype)
        self.bias = empty_param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear.linear(x, self.weight)
        if self.tp_size > 1:
            out = self.all_reduce(out)
        return out if self.bias is None else out + self.bias

    def load(self, kind: str, value: torch.Tensor | QuantizedParts, part: None = None) -> str:
        """The weight (this rank's columns of it) or the bias, from the full checkpoint tensor;
        returns the slot filled."""
        if kind == "bias":
            return copy_into("bias", self.bias, value)
        if not isinstance(value, QuantizedParts):
            value = shard(value, 1, self.weight.shape[1], self.tp_rank, self.tp_size)
        return load_matrix(self, "weight", value)

    def finish_loading(self) -> None:
        _prepare(self)


def _prepare(module: ColumnParallelLinear | RowParallelLinear) -> None:
    prepared = linear.prepare_weight(module.weight)
    if prepared is not module.weight:
        replace_parameter(module, "weight", prepared)


def finish_loading(model: nn.Module) -> None:
    """After a model's last checkpoint tensor: every parallel linear layer's finish_loading."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.finish_loading()
