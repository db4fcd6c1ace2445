"""Routed experts (mixture of experts) over a flat batch of tokens.

A router (hidden -> num_experts, replicated on every rank) scores each token; softmax in
float32 over the experts, the top k kept per token and, where the model says so, renormalised
to sum to 1. Each expert is a SiLU-gated MLP run only over the tokens routed to it: the
(token, expert) pairs are sorted by expert, so each expert's tokens form one contiguous run
and take one matmul per matrix; the outputs, scaled by their routing weights, are summed back
per token with index_add. Reading the counts back makes a step's work depend on its values,
so a CUDA graph cannot hold it: the models that use it say so (supports_cuda_graphs), and
the engine runs their steps eagerly on a GPU; capturing one anyway raises an error.

Expert matrices are stacked per layer, gate/up as [num_experts, 2 * inter, hidden] and down as
[num_experts, hidden, inter], and multiplied with torch (F.linear on one expert's slice).
Under tensor parallelism each expert's intermediate dimension is split like the dense MLP's
(gate/up rows, down columns) and the partial outputs are all-reduced. Quantised experts (GGUF
blocks) are future work: load refuses QuantizedParts, and the GGUF loader hands experts over
in float32, one expert at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.executor.layers.activation import silu_and_mul
from aphrodite.executor.layers.parallel_linear import (AllReduce, ColumnParallelLinear,
                                                       torch_all_reduce)
from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.executor.layers.weights import copy_into, empty_param, shard


def route(router_logits: torch.Tensor, top_k: int,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top_k experts [tokens, top_k] and their float32 weights, from the router's
    logits [tokens, num_experts]."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def run_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum over k of weights[t, k] * expert_{experts[t, k]}(x[t]) for every token t.
    gate_up [E, 2 * inter, hidden] (gate rows first), down [E, hidden, inter]."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)            # (token, k) pairs grouped by expert
    tokens_sorted = order // top_k
    weights_sorted = weights.reshape(-1)[order]
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens_sorted[start:start + count]
        hidden = silu_and_mul(F.linear(x[rows], gate_up[expert]))
        y = F.linear(hidden, down[expert]) * weights_sorted[start:start + count, None]
        out.index_add_(0, rows, y.to(out.dtype))
        start += count
    return out


class StackedExperts(nn.Module):
    """One matrix per expert stacked as weight [num_experts, rows, cols]; each expert's rows are
    the parts in `parts` (name -> rows on this rank), one checkpoint matrix each.

    shard_dim 0: a part's rows are split across ranks (gate, up); 1: the columns are (down).
    part_rows names every (expert, part) slot, so expected_slots asks for each of them."""

    def __init__(self, num_experts: int, parts: dict[str, int], cols: int, shard_dim: int,
                 dtype: torch.dtype, tp_rank: int, tp_size: int):
        super().__init__()
        self.parts, self.cols, self.shard_dim = parts, cols, shard_dim
        self.tp_rank, self.tp_size = tp_rank, tp_size
        starts, start = {}, 0
        for name, rows in parts.items():
            starts[name], start = start, start + rows
        self._row_starts = starts
        self.weight = empty_param(num_experts, start, cols, dtype=dtype)
        self.part_rows = {f"{e}.{name}": rows for e in range(num_experts)
                          for name, rows in parts.items()}

    def load(self, expert: int, part: str, value: torch.Tensor | QuantizedParts) -> str:
        """Expert `expert`'s matrix `part` from the full checkpoint tensor; returns the slot."""
        if isinstance(value, QuantizedParts):
            raise ValueError("quantised (GGUF) expert matrices are not supported yet")
        slot = f"weight.{expert}.{part}"
        if f"{expert}.{part}" not in self.part_rows:
            raise ValueError(f"no expert matrix {expert}.{part} in this layer")
        size = self.parts[part] if self.shard_dim == 0 else self.cols
        value = shard(value, self.shard_dim, size, self.tp_rank, self.tp_size)
        return copy_into(slot, self.weight[expert], value, self._row_starts[part])


class SparseMoe(nn.Module):
    """The routed experts of one layer: router `gate`, experts `experts.gate_up_proj` and
    `experts.down_proj`."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
                 all_reduce: AllReduce = torch_all_reduce):
        super().__init__()
        if inter % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} must divide the experts' "
                             f"intermediate size ({inter})")
        inter //= tp_size
        self.top_k, self.renormalize = top_k, renormalize
        self.tp_size, self.all_reduce = tp_size, all_reduce
        # The router is replicated: every rank routes every token.
        self.gate = ColumnParallelLinear(hidden, {"router": num_experts}, False, dtype)
        self.experts = nn.Module()
        self.experts.gate_up_proj = StackedExperts(num_experts, {"gate": inter, "up": inter},
                                                   hidden, 0, dtype, tp_rank, tp_size)
        self.experts.down_proj = StackedExperts(num_experts, {"down": hidden}, inter, 1, dtype,
                                                tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # Each expert's token count is read back to pick its rows: no fixed graph to capture.
            raise RuntimeError("mixture-of-experts layers route tokens by their values and cannot "
                               "be captured in a CUDA graph: run with --enforce-eager")
        weights, experts = route(self.gate(x), self.top_k, self.renormalize)
        out = run_experts(x, self.experts.gate_up_proj.weight, self.experts.down_proj.weight,
                          weights, experts)
        return self.all_reduce(out) if self.tp_size > 1 else out

    def load_expert(self, expert: int, part: str, value: torch.Tensor | QuantizedParts) -> str:
        """part: "gate", "up" or "down"; returns the slot filled, relative to this module."""
        matrix = "down_proj" if part == "down" else "gate_up_proj"
        return f"experts.{matrix}.{getattr(self.experts, matrix).load(expert, part, value)}"
