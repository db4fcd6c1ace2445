"""Qwen2-MoE and Qwen3-MoE: mixture-of-experts decoders (models/mixtral.py's MoeForCausalLM).

A layer is sparse unless it is in `mlp_only_layers` or (index + 1) is not a multiple of
`decoder_sparse_step`; a dense layer has Llama's MLP with `intermediate_size`. The routed
experts have `moe_intermediate_size`, and their top-k weights are renormalised when
`norm_topk_prob`.

Qwen2-MoE: q/k/v biases (`qkv_bias`, as Qwen2), and every sparse layer adds a shared expert,
a gated MLP with `shared_expert_intermediate_size`, scaled by sigmoid(shared_expert_gate(x)).
Qwen3-MoE: Qwen3's attention (models/qwen3.py: RMS norm over each q and k head before rotary),
no shared expert.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

from aphrodite.executor.layers.moe import SparseMoe
from aphrodite.executor.layers.parallel_linear import ColumnParallelLinear
from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.executor.models.llama import MLP, Attention
from aphrodite.executor.models.mixtral import MoeForCausalLM, require_silu
from aphrodite.executor.models.qwen3 import Qwen3Attention, load_qk_norm

# HF module (after "model.layers.N.") -> ours, and which part of a stacked projection it is.
_SHARED = {
    "mlp.shared_expert.gate_proj": ("mlp.shared_expert.gate_up_proj", "gate"),
    "mlp.shared_expert.up_proj": ("mlp.shared_expert.gate_up_proj", "up"),
    "mlp.shared_expert.down_proj": ("mlp.shared_expert.down_proj", None),
    "mlp.shared_expert_gate": ("mlp.shared_expert_gate", "gate"),
}
_SHARED_NAME = re.compile(r"^model\.layers\.(\d+)\.(mlp\.shared_expert[\w.]*)\.weight$")


def is_sparse(config, index: int) -> bool:
    """Whether layer `index` has routed experts (transformers' Qwen2/3-MoE decoder layer rule)."""
    return (index not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (index + 1) % config.decoder_sparse_step == 0)


class SharedExpertMoe(SparseMoe):
    """Routed experts plus a shared expert gated per token by sigmoid(shared_expert_gate(x))."""

    def __init__(self, config, dtype, tp_rank, tp_size, all_reduce):
        super().__init__(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                         config.num_experts_per_tok, config.norm_topk_prob, dtype, tp_rank,
                         tp_size, all_reduce)
        shared = SimpleNamespace(hidden_size=config.hidden_size, hidden_act=config.hidden_act,
                                 intermediate_size=config.shared_expert_intermediate_size)
        self.shared_expert = MLP(shared, dtype, tp_rank, tp_size, all_reduce)
        self.shared_expert_gate = ColumnParallelLinear(config.hidden_size, {"gate": 1}, False,
                                                       dtype)   # replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


class Qwen2MoeForCausalLM(MoeForCausalLM):
    def build_attention(self, config, dtype, tp_rank, tp_size, all_reduce) -> nn.Module:
        attn = Attention(config, dtype, tp_rank, tp_size, all_reduce)
        # Llama's attention reads attention_bias; Qwen2-MoE's config says qkv_bias.
        if getattr(config, "qkv_bias", True):
            attn.qkv_proj = ColumnParallelLinear(config.hidden_size, attn.qkv_proj.part_rows,
                                                 True, dtype, tp_rank, tp_size)
        return attn

    def build_mlp(self, index, config, dtype, tp_rank, tp_size, all_reduce) -> nn.Module:
        if not is_sparse(config, index):
            return MLP(config, dtype, tp_rank, tp_size, all_reduce)
        require_silu(config)
        return SharedExpertMoe(config, dtype, tp_rank, tp_size, all_reduce)

    def _load_one(self, name: str, value: torch.Tensor | QuantizedParts) -> str | None:
        match = _SHARED_NAME.match(name)
        if match is None or match.group(2) not in _SHARED:
            return super()._load_one(name, value)
        index, module = match.groups()
        if not isinstance(self.layers[int(index)].mlp, SharedExpertMoe):
            raise ValueError("a shared expert in a layer that the config makes dense")
        ours, part = _SHARED[module]
        if module == "mlp.shared_expert_gate" and isinstance(value, torch.Tensor):
            value = value.reshape(1, -1)   # GGUF stores this one-row matrix as a vector
        prefix = f"layers.{index}.{ours}"
        return f"{prefix}.{self.get_submodule(prefix).load('weight', value, part)}"


class Qwen3MoeForCausalLM(MoeForCausalLM):
    def build_attention(self, config, dtype, tp_rank, tp_size, all_reduce) -> nn.Module:
        return Qwen3Attention(Attention(config, dtype, tp_rank, tp_size, all_reduce), config, dtype)

    def build_mlp(self, index, config, dtype, tp_rank, tp_size, all_reduce) -> nn.Module:
        if not is_sparse(config, index):
            return MLP(config, dtype, tp_rank, tp_size, all_reduce)
        require_silu(config)
        return SparseMoe(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                         config.num_experts_per_tok, config.norm_topk_prob, dtype, tp_rank,
                         tp_size, all_reduce)

    def _load_one(self, name: str, value: torch.Tensor | QuantizedParts) -> str | None:
        return load_qk_norm(self, name, value) or super()._load_one(name, value)
