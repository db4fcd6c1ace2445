"""Paged attention: a block-structured KV cache and the backends that attend over it.

kv_cache.py     the cache: one tensor per layer, [2 (key, value), num_blocks, block_size,
                num_kv_heads, head_dim], a sequence's tokens found through its block table;
                allocation (a lazily zeroed pool on CPU) and write_kv.
metadata.py     AttentionMetadata: a step's batch layout, built on the host once a step.
selector.py     AttentionConfig (model, cache and device), select_backends and paged_attention.
cpu.py          C++ kernels (CPU): paged decode, and every prefill chunk of a step in one call.
triton.py       Triton decode kernel (CUDA).
torch_paged.py  torch operators, any device: padded-gather decode (what CUDA graphs replay
                without Triton), grouped decode (CPU without the C++ kernels), per-sequence
                SDPA prefill.

AttentionMetadata.build asks the selector once per step which backend serves the step's
decode rows and which its prefill chunks: the C++ kernels on CPU where they are built and
take the model's dtype, cache dtype and head shape, Triton decode on CUDA, torch otherwise
(the rules in full: selector.py). Every layer's paged_attention runs that choice.
"""

from aphrodite.executor.layers.attention.kv_cache import (allocate_kv_caches,
                                                          kv_cache_bytes_per_block,
                                                          populate_host_pool, write_kv)
from aphrodite.executor.layers.attention.metadata import AttentionMetadata
from aphrodite.executor.layers.attention.selector import AttentionConfig, paged_attention

__all__ = ["AttentionConfig", "AttentionMetadata", "allocate_kv_caches",
           "kv_cache_bytes_per_block", "paged_attention", "populate_host_pool", "write_kv"]
