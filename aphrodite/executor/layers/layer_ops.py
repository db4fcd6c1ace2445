"""A decoder layer's elementwise steps: C++ for float32 on CPU (kernels/layer_ops.h), else torch.

Each is one call either way: the residual add fused into the RMS norm that follows it (the
residual stream x is updated in place), rotary embedding fused with the KV-cache write, and
the SiLU-gated product. Default model's sizes, 2 threads, AMD EPYC (AVX2), us per call,
torch -> C++ (rotary + write: q and k rotated, k and v stored):

    tokens         add + rms_norm    rotary + write    silu * up
    1                 19 -> 4           41 -> 7           8 -> 5
    35                34 -> 10          70 -> 11         48 -> 22
    2048            6400 -> 160      12000 -> 150      12600 -> 1040

(torch at 2048 tokens also pays for mapping fresh multi-MB temporaries each call.) The mixed
c=64 engine replay (benchmarks/engine_replay.py) went from 65.8 to 61.4 s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.attention import AttentionMetadata, write_kv
from aphrodite.executor.layers.rotary import RotaryEmbedding


def _on_kernels(x: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and x.device.type == "cpu"
            and cpu_kernels.library_available())


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x += delta in place (when delta is given); returns F.rms_norm(x) * weight."""
    if _on_kernels(x):
        return cpu_kernels.add_rms_norm(x, delta, weight, eps)
    if delta is not None:
        x.add_(delta)
    return F.rms_norm(x, weight.shape, weight, eps)


def rotate_and_cache(qkv: torch.Tensor, heads: int, kv_heads: int,
                     cos_sin: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                     meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [tokens, heads + 2 kv_heads, head_dim] -> q, k, v: q and k rotated by their tokens'
    positions, and k and v stored in the tokens' cache slots."""
    if _on_kernels(qkv) and cpu_kernels.cache_supported(kv_cache):
        cpu_kernels.rotate_and_cache(qkv, heads, *cos_sin, meta.slot_mapping, kv_cache)
        return qkv[:, :heads], qkv[:, heads: heads + kv_heads], qkv[:, heads + kv_heads:]
    # q and k heads are adjacent in the fused projection: rotate them in one go.
    qk = RotaryEmbedding.apply(qkv[:, : heads + kv_heads], cos_sin)
    q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
    write_kv(k, v, kv_cache, meta)
    return q, k, v


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * inter] (gate, then up) -> F.silu(gate) * up."""
    if _on_kernels(gate_up):
        return cpu_kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
