"""Paged attention: a block-structured KV cache and the backends that attend over it.

kv_cache.py     the cache: one tensor per layer, [2 (key, value), num_blocks, block_size,
                num_kv_heads, head_dim], a sequence's tokens found through its block table;
                allocation (a lazily zeroed pool on CPU) and write_kv.
metadata.py     AttentionMetadata: a step's batch layout, built on the host once a step.
config.py       AttentionConfig: the model's heads and dtype, the cache's dtype and geometry,
                the device; optionally a backend to force.
selector.py     select_backends: which backend serves the step's decode rows and which its
                prefill chunks, chosen once per step by AttentionMetadata.build.
dispatch.py     paged_attention: each layer runs the chosen backends.
cpu.py          C++ kernels (CPU): paged decode, and every prefill chunk of a step in one call.
triton.py       Triton decode kernel (CUDA).
torch_paged.py  torch operators, any device: padded-gather decode (what CUDA graphs replay
                without Triton), grouped decode (CPU without the C++ kernels), per-sequence
                SDPA prefill.

The selector picks the C++ kernels on CPU where they are built and take the model's dtype,
the cache's dtype and the head shape, Triton decode on CUDA, torch otherwise (the rules in
full: selector.py).
"""

from aphrodite.executor.layers.attention.config import AttentionConfig
from aphrodite.executor.layers.attention.dispatch import paged_attention
from aphrodite.executor.layers.attention.kv_cache import (allocate_kv_caches,
                                                          kv_cache_bytes_per_block,
                                                          populate_host_pool, write_kv)
from aphrodite.executor.layers.attention.metadata import AttentionMetadata

__all__ = ["AttentionConfig", "AttentionMetadata", "allocate_kv_caches",
           "kv_cache_bytes_per_block", "paged_attention", "populate_host_pool", "write_kv"]
