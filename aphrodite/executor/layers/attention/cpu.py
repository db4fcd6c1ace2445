"""The C++ backend (CPU): paged decode and prefill attention that read keys and values where
they lie in the cache (kernels/cpu/paged_decode_attention.h, paged_prefill_attention.h).

Decode takes every decode row of a step in one call, prefill every prefill chunk; both apply
a layer's sliding window (reading no block wholly before it) and soft cap. The support
checks ask the kernels' own predicates (cpu_kernels.supports, supports_prefill,
cache_supported) about empty tensors of the config's shapes and dtypes, so the selector
decides once per step what those predicates would answer for each layer's tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from aphrodite.executor.kernels.cpu import ops as cpu_kernels

if TYPE_CHECKING:
    from aphrodite.executor.layers.attention.config import AttentionConfig


def kernels_built() -> bool:
    """Whether the C++ kernels built and loaded (the first call builds them)."""
    return cpu_kernels.library_available()


def decode_supported(config: AttentionConfig) -> bool:
    """Whether the decode kernel reads this cache (float32, bfloat16, float16 with F16C;
    head_dim a multiple of 8)."""
    return cpu_kernels.supports(_empty_cache(config))


def prefill_supported(config: AttentionConfig) -> bool:
    """Whether the prefill kernel takes this model's queries and cache (float32 queries, a
    float32 or F16C float16 cache, head_dim a multiple of 8, at most
    cpu_kernels.PREFILL_TILE_ROWS query heads per kv head)."""
    queries = torch.empty((0, config.num_heads, config.head_dim), dtype=config.dtype,
                          device=config.device)
    return cpu_kernels.supports_prefill(queries, _empty_cache(config))


def cache_supported(config: AttentionConfig) -> bool:
    """Whether the kernels that write the cache take it (the fused decode step of
    models/fused_decode.py among them): float32, or float16 with F16C."""
    return cpu_kernels.cache_supported(_empty_cache(config))


def _empty_cache(config: AttentionConfig) -> torch.Tensor:
    return torch.empty((2, 0, config.block_size, config.num_kv_heads, config.head_dim),
                       dtype=config.cache_dtype, device=config.device)


def decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, scale: float, window: int | None = None,
           softcap: float | None = None) -> torch.Tensor:
    """q [B, H, D], one new token per sequence -> [B, H, D]."""
    assert cpu_kernels.supports(kv_cache), "the selector chose it for another cache"
    return cpu_kernels.paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale,
                                              window, softcap)


def prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
            prefill_seqs: torch.Tensor, scale: float, out: torch.Tensor,
            window: int | None = None, softcap: float | None = None) -> None:
    """Writes the prefill tokens' rows of out [T, H, D]; prefill_seqs as
    AttentionMetadata.prefill_seqs lists them."""
    # The selector checked dtypes and shapes; each token's heads must also lie contiguous,
    # as they do in a view of the fused qkv projection.
    assert cpu_kernels.supports_prefill(q, kv_cache), "queries or cache the kernel cannot read"
    cpu_kernels.paged_prefill_attention(q, kv_cache, block_tables, prefill_seqs, scale, out,
                                        window, softcap)
