"""The Triton backend (CUDA): decode rows through kernels/triton/paged_decode.py, which reads
keys and values straight from the paged cache and launches a grid fixed by host ints, so CUDA
graphs capture and replay it.

Triton is imported only when a step runs here: the package is absent from CPU installs.
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def decode_supported(head_dim: int) -> bool:
    """Whether Triton is installed and the kernel takes head_dim (a power of two, >= 16)."""
    if head_dim & (head_dim - 1) or head_dim < 16:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, max_seq_len: int, scale: float, window: int | None = None,
           softcap: float | None = None) -> torch.Tensor:
    """q [B, H, D], one new token per sequence -> [B, H, D]; window and softcap as
    paged_attention takes them."""
    from aphrodite.executor.kernels.triton.paged_decode import paged_decode_attention
    return paged_decode_attention(q, kv_cache, block_tables, seq_lens, max_seq_len, scale,
                                  window, softcap)
