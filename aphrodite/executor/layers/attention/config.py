"""AttentionConfig: what the choice of attention backends depends on, and the backends' names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# cpu: the C++ kernel (cpu.py); triton: the Triton kernel (triton.py); torch_grouped and
# torch_padded: torch_paged.grouped_decode and padded_decode.
DECODE_BACKENDS = ("cpu", "triton", "torch_grouped", "torch_padded")
# cpu: the C++ kernel (cpu.py); torch: torch_paged.prefill.
PREFILL_BACKENDS = ("cpu", "torch")


@dataclass(frozen=True)
class AttentionConfig:
    """Fixed for a model, its KV cache and its device; AttentionMetadata.build takes it."""
    device: torch.device
    dtype: torch.dtype            # the model's, which the queries have
    cache_dtype: torch.dtype
    num_heads: int                # query heads (on this rank)
    num_kv_heads: int
    head_dim: int
    block_size: int
    # A backend to use instead of the selector's choice (benchmarks compare them; tests reach
    # each on one machine); it must be able to run here.
    decode: str | None = None     # one of DECODE_BACKENDS
    prefill: str | None = None    # one of PREFILL_BACKENDS
    # Not here: sliding windows and soft caps. Every backend applies both, and each layer
    # passes its own to paged_attention, so the choice of backends does not depend on them.

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        if self.decode not in (None, *DECODE_BACKENDS):
            raise ValueError(f"decode backend {self.decode!r} is none of {DECODE_BACKENDS}")
        if self.prefill not in (None, *PREFILL_BACKENDS):
            raise ValueError(f"prefill backend {self.prefill!r} is none of {PREFILL_BACKENDS}")

    @classmethod
    def for_cache(cls, kv_cache: torch.Tensor, num_heads: int, dtype: torch.dtype,
                  decode: str | None = None, prefill: str | None = None) -> AttentionConfig:
        """The config of a model with num_heads query heads in `dtype` over one layer's
        kv_cache (which gives the device, cache dtype and geometry)."""
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(kv_cache.device, dtype, kv_cache.dtype, num_heads, num_kv_heads, head_dim,
                   block_size, decode, prefill)
