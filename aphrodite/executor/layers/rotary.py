"""Rotary position embeddings (HF "rotate half" layout) with precomputed cos/sin tables, and
their application fused with the KV-cache write.

rotate_and_cache rotates q and k and stores k and v in one C++ call for float32 on CPU
(kernels/layer_ops.h), torch otherwise. One decode row of the default model: 7 us for the C++
call, 41 us in torch (benchmarks/step_profile.py counts it under forward.rest).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.attention import AttentionMetadata, write_kv
from aphrodite.model_files import RopeSettings

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def inverse_frequencies(head_dim: int, rope: RopeSettings) -> torch.Tensor:
    """Per-pair rotation speeds, computed exactly as transformers does (float32)."""
    if rope.rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope type {rope.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.params["factor"]
    if rope.rope_type == "llama3":
        return _llama3_scaling(inv_freq, rope.params)
    if rope.rope_type == "longrope":
        return _longrope_frequencies(exponents, rope, "short_factor")
    return inv_freq


def _longrope_frequencies(exponents: torch.Tensor, rope: RopeSettings, which: str) -> torch.Tensor:
    # Phi-3 LongRoPE: each frequency divided by its own factor, the short set within the
    # pretraining context and the long set beyond it (same rounding as transformers).
    factors = torch.tensor(rope.params[which], dtype=torch.float32)
    return 1.0 / (factors * rope.theta ** exponents)


def longrope_attention_factor(params: dict) -> float:
    """The cos/sin multiplier: the config's attention_factor, else sqrt(1 + ln(factor) /
    ln(original_max_position_embeddings)) for factor > 1 (model_files.rope_settings fills factor
    in as max_position_embeddings / original_max_position_embeddings, as transformers does)."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor, original = params["factor"], params["original_max_position_embeddings"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _llama3_scaling(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    # Llama 3.1: slow (long-wavelength) frequencies are divided by `factor`, fast ones kept,
    # and those in between interpolated smoothly.
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: RopeSettings, dtype: torch.dtype):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.dtype = dtype
        self.base_inv_freq = inverse_frequencies(head_dim, rope)
        # LongRoPE: (long-factor frequencies, first position that uses them, cos/sin multiplier).
        # transformers picks one factor set per forward pass, the long one for the whole
        # sequence once it is longer than original_max_position_embeddings; a table shared by
        # a batch picks per position instead, the long set from that position on. The two agree
        # on every sequence within original_max_position_embeddings; past it, our keys before
        # that position keep their short-factor rotation (transformers recomputes them).
        self.longrope = None
        if rope.rope_type == "longrope":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
            self.longrope = (_longrope_frequencies(exponents, rope, "long_factor"),
                             int(rope.params["original_max_position_embeddings"]),
                             longrope_attention_factor(rope.params))
        self._build_tables(self.base_inv_freq)

    def _build_tables(self, inv_freq: torch.Tensor) -> None:
        # Tables are computed on the CPU (as transformers does) and then moved to the model's device.
        device = self.cos.device if hasattr(self, "cos") else torch.get_default_device()
        positions = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
        angles = positions[:, None] * inv_freq[None, :].float()     # [P, head_dim / 2]
        if self.longrope is not None:
            long_inv_freq, switch, _ = self.longrope
            angles[switch:] = positions[switch:, None] * long_inv_freq[None, :]
        # Full-width tables with the sign of rotate-half folded into sin, so applying them is
        # x * cos + swap_halves(x) * sin. Computed in float32, stored in the model dtype (as
        # transformers does per step).
        cos, sin = angles.cos(), angles.sin()
        if self.longrope is not None:
            cos, sin = cos * self.longrope[2], sin * self.longrope[2]
        self.register_buffer("cos", torch.cat((cos, cos), -1).to(self.dtype).to(device), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), -1).to(self.dtype).to(device), persistent=False)

    def set_frequency_divisors(self, divisors: torch.Tensor) -> None:
        """llama.cpp's `rope_freqs` tensor: per-frequency divisors (how GGUF stores Llama 3.1
        scaling)."""
        self._build_tables(self.base_inv_freq / divisors.float().cpu())

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for a batch's positions, [T, 1, head_dim]; done once per forward pass."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] by its tokens' positions; returns a new tensor."""
        cos, sin = cos_sin
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat((second, first), dim=-1) * sin


def rotate_and_cache(qkv: torch.Tensor, heads: int, kv_heads: int,
                     cos_sin: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                     meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [tokens, heads + 2 kv_heads, head_dim] -> q, k, v: q and k rotated by their tokens'
    positions, and k and v stored in the tokens' cache slots."""
    if (qkv.dtype == torch.float32 and qkv.device.type == "cpu"
            and cpu_kernels.library_available() and cpu_kernels.cache_supported(kv_cache)):
        cpu_kernels.rotate_and_cache(qkv, heads, *cos_sin, meta.slot_mapping, kv_cache)
        return qkv[:, :heads], qkv[:, heads: heads + kv_heads], qkv[:, heads + kv_heads:]
    # q and k heads are adjacent in the fused projection: rotate them in one go.
    qk = RotaryEmbedding.apply(qkv[:, : heads + kv_heads], cos_sin)
    q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
    write_kv(k, v, kv_cache, meta)
    return q, k, v
