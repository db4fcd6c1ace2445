"""The paged KV cache: its layout, its memory, and the writes of new tokens' keys and values.

One tensor per layer, [2 (key, value), num_blocks, block_size, num_kv_heads, head_dim]. A
token's flat slot is block_id * block_size + offset; a sequence's block table lists its block
ids in order. The cache's dtype may differ from the model's (a float16 cache under a float32
model on CPU): writes round to it, readers widen what they read.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import time
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from aphrodite.executor.layers.attention.metadata import AttentionMetadata


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    # Zeroed, not empty: padded block-table entries point at real blocks whose values are
    # multiplied by zero attention weights, and 0 * NaN from uninitialised memory would be NaN.
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if torch.device(device).type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    # On CPU torch.zeros would write every page of a multi-GB pool at start-up (the default
    # 4 GiB: 8 s on the 2-core dev VM, benchmarks/startup.py). An anonymous mapping is zeroed
    # lazily by the kernel when a block is first used instead.
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return [_zeroed_host_buffer(nbytes).view(dtype).view(shape) for _ in range(num_layers)]


def _zeroed_host_buffer(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes], zero, its 4 KiB pages given on first touch (or by populate_host_pool).

    A private mapping without a huge-page hint: writing a 2048-token prefill's keys and
    values into fresh blocks costs 1.1 ms a layer this way, 1.5 ms in a shared mapping (mmap's
    default for fileno -1) and about 6 ms with MADV_HUGEPAGE, where every fault zeroes 2 MiB
    (AMD EPYC VM, 2 threads)."""
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(buffer, dtype=torch.uint8)[:nbytes]   # the tensor keeps it mapped


def populate_host_pool(caches: list[torch.Tensor], seconds: float) -> int:
    """Faults a CPU KV pool's pages in, lowest blocks first, for at most `seconds`; returns
    how many blocks (of every layer) are done.

    Left to the first write, each 4 KiB page costs a fault inside a step, in a parallel
    region where the other thread waits: in benchmarks/engine_replay.py's mixed c=64 replay
    about 300,000 of them, 2 s of its 36. madvise(MADV_POPULATE_WRITE) (Linux 5.14+) does a
    range from one call, at 0.26 us a page on a 2-vCPU Xeon VM when the memory was used
    before, up to 6 us when the VM's host first backs it. The whole default pool (4 GiB)
    takes 1-4 s there, so start-up gives it a bounded time; the rest faults in on first use.
    The scheduler hands never-used blocks out in id order (its free list is first in, first
    out), so the low blocks are the ones the first requests get.
    """
    madvise = _madvise()
    if madvise is None or not caches:
        return 0
    num_blocks = caches[0].shape[1]
    block_bytes = caches[0][0, 0].numel() * caches[0].element_size()    # one block of K or V
    deadline = time.monotonic() + seconds
    done = 0
    while done < num_blocks and time.monotonic() < deadline:
        end = min(num_blocks, done + 256)
        for cache in caches:
            for half in cache:                                       # keys, values
                first = (half.data_ptr() + done * block_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
                if madvise(first, half.data_ptr() + end * block_bytes - first,
                           _MADV_POPULATE_WRITE) != 0:
                    return done                         # before Linux 5.14: no such advice
        done = end
    return done


_MADV_POPULATE_WRITE = 23


@cache
def _madvise():
    """libc's madvise, or None off Linux."""
    if sys.platform != "linux":
        return None
    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def kv_cache_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                             dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * element_size


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store the new tokens' keys and values in their slots."""
    if meta.write_slots is None:
        return
    if meta.write_token_idx is not None:
        k, v = k.index_select(0, meta.write_token_idx), v.index_select(0, meta.write_token_idx)
    kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)   # a float16 cache under float32
    kv_cache[0].view(-1, kv_heads, head_dim).index_copy_(0, meta.write_slots, k)
    kv_cache[1].view(-1, kv_heads, head_dim).index_copy_(0, meta.write_slots, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """One half (keys or values) of a layer's cache, [..., num_blocks] block ids ->
    [..., num_blocks * block_size, kv_heads, head_dim], a copy in block-table order."""
    _, block_size, kv_heads, head_dim = cache.shape
    ids = block_table[..., :num_blocks]
    gathered = cache.index_select(0, ids.reshape(-1))
    return gathered.view(*ids.shape[:-1], num_blocks * block_size, kv_heads, head_dim)
