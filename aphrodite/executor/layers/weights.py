"""Filling a model's parameters from full (unsharded) checkpoint tensors.

Parameters start uninitialised (empty_param). Loading copies each checkpoint tensor, or this
rank's shard of it, into place (shard, copy_into), or swaps a parameter for another tensor
(replace_parameter: a QuantizedWeight, a matrix packed for its kernel), which is a plain
attribute from then on. Every parameter must be filled: expected_slots names what a model
needs, the parts of a stacked projection apart, as the modules' load methods report them.
"""

from __future__ import annotations

import torch
from torch import nn

from aphrodite.executor.layers.linear import quantized_weight
from aphrodite.executor.layers.quantized import QuantizedParts


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by load_weights (which checks that).
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def shard(tensor: torch.Tensor, dim: int, size: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of `size` along `dim` of a full checkpoint tensor."""
    if tensor.shape[dim] != size * tp_size:
        raise ValueError(f"shape {tuple(tensor.shape)} does not split into {tp_size} x {size}")
    return tensor.narrow(dim, tp_rank * size, size)


def copy_into(name: str, param: torch.Tensor | None, tensor: torch.Tensor,
              row_start: int = 0) -> str:
    """Copy `tensor` into `param` (at row_start, for one part of a stacked matrix); returns name."""
    if param is None:
        raise ValueError(f"checkpoint has {name} but the config says the model has none")
    target = param.data if row_start == 0 and tensor.shape == param.shape else \
        param.data.narrow(0, row_start, tensor.shape[0])
    if target.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(target.shape)}")
    target.copy_(tensor)
    return name


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    delattr(module, name)
    setattr(module, name, value)


def load_matrix(module: nn.Module, name: str,
                value: torch.Tensor | QuantizedParts | list[QuantizedParts]) -> str:
    """A whole matrix: copied into module.<name>, or, quantised (one matrix, or a stacked
    one's parts in row order), held as a QuantizedWeight."""
    if not isinstance(value, (QuantizedParts, list)):
        return copy_into(name, getattr(module, name), value)
    weight = quantized_weight(value)
    if tuple(weight.shape) != tuple(getattr(module, name).shape):
        raise ValueError(f"{name}: quantised shape {tuple(weight.shape)} "
                         f"!= {tuple(getattr(module, name).shape)}")
    replace_parameter(module, name, weight)
    return name


def expected_slots(model: nn.Module) -> set[str]:
    """What load_weights must fill, before it starts: each parameter by name, and each part
    of a stacked projection's (a module with `part_rows`) as "<module>.<weight|bias>.<part>"."""
    slots = set()
    for name, _ in model.named_parameters():
        owner, _, kind = name.rpartition(".")
        parts = getattr(model.get_submodule(owner), "part_rows", None) if owner else None
        slots |= {f"{name}.{part}" for part in parts} if parts else {name}
    return slots
