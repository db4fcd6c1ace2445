"""Qwen3: the Llama decoder (models/llama.py) with QK-norm.

Each layer's attention RMS-norms every q and k head over its head_dim (weights
self_attn.q_norm / k_norm, [head_dim], the same on every tensor-parallel rank) after the q/k/v
projection and before rotary. Everything else is Llama's: the stacked projections (q/k/v bias
only when attention_bias), head_dim from the config, tied embeddings when the config says so.
A config with use_sliding_window is served up to its window (model_files.max_model_len), where
full attention is the same thing.

On CPU a decode step of a model whose matrices all hold GGUF blocks runs every layer in one
C++ call, QK-norm included (models/fused_decode.py reads q_norm / k_norm from the attention);
prefill, mixed steps and other weights run layer by layer.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from aphrodite.executor.layers import attention
from aphrodite.executor.layers.attention import AttentionMetadata
from aphrodite.executor.layers.norm import HeadRMSNorm
from aphrodite.executor.layers.parallel_linear import AllReduce
from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.executor.layers.rotary import rotate_and_cache
from aphrodite.executor.layers.weights import copy_into
from aphrodite.executor.models.llama import Attention, LlamaForCausalLM

_QK_NORM = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qk]_norm)\.weight$")


class Qwen3Attention(nn.Module):
    """Llama's attention, taking over the projections of a built one, with QK-norm added."""

    def __init__(self, llama: Attention, config, dtype: torch.dtype):
        super().__init__()
        self.heads, self.kv_heads = llama.heads, llama.kv_heads    # on this rank
        self.head_dim, self.scale = llama.head_dim, llama.scale
        self.qkv_proj, self.o_proj = llama.qkv_proj, llama.o_proj
        self.q_norm = HeadRMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.k_norm = HeadRMSNorm(self.head_dim, config.rms_norm_eps, dtype)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(tokens, -1, self.head_dim)
        q_end, k_end = self.heads, self.heads + self.kv_heads
        qkv[:, :q_end] = self.q_norm(qkv[:, :q_end])
        qkv[:, q_end:k_end] = self.k_norm(qkv[:, q_end:k_end])
        q, k, v = rotate_and_cache(qkv, self.heads, self.kv_heads, cos_sin, kv_cache, meta)
        out = attention.paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(tokens, -1))


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
                 all_reduce: AllReduce | None = None, max_positions: int | None = None):
        super().__init__(config, dtype, tp_rank, tp_size, all_reduce, max_positions)
        for layer in self.layers:
            layer.self_attn = Qwen3Attention(layer.self_attn, config, dtype)

    def _load_one(self, name: str, value: torch.Tensor | QuantizedParts) -> str | None:
        return load_qk_norm(self, name, value) or super()._load_one(name, value)


def load_qk_norm(model: nn.Module, name: str, value: torch.Tensor) -> str | None:
    """Loads `name` if it is a layer's q_norm or k_norm weight and returns its slot; None for
    any other weight."""
    match = _QK_NORM.match(name)
    if match is None:
        return None
    slot = f"layers.{match.group(1)}.self_attn.{match.group(2)}.weight"
    return copy_into(slot, model.get_submodule(slot.removesuffix(".weight")).weight, value)
