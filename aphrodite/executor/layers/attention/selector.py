"""Which backend serves a step's decode rows and which its prefill chunks, and running them.

AttentionMetadata.build calls select_backends once per step, from the step's AttentionConfig;
paged_attention, called by every layer, runs what it chose without checking again. The
rules, first match wins:

decode rows (one new token):
    cpu            CPU, the C++ kernels built, a cache the decode kernel reads
    torch_padded   CPU, the C++ kernels built, a cache it does not read (head_dim not a
                   multiple of 8, or float16 without F16C)
    torch_grouped  CPU without the C++ kernels
    triton         CUDA, Triton installed, head_dim a power of two >= 16
    torch_padded   anything else
prefill chunks (several new tokens):
    cpu            CPU, the C++ kernels built, float32 model, a cache the prefill kernel
                   reads, at most cpu_kernels.PREFILL_TILE_ROWS query heads per kv head
    torch          anything else

On CPU the C++ decode kernel's attention takes 54.8 ms of a default-model decode step at
batch 64, context 128+, grouped torch attention 112.6 ms (benchmarks/step_profile.py
--attention kernel grouped).

AttentionConfig.decode and .prefill, when set, name the backend to use instead of the
rules' choice (benchmarks compare them; tests reach each backend on one machine); the named
backend must be able to run there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aphrodite.executor.layers.attention import cpu, torch_paged, triton

if TYPE_CHECKING:
    from aphrodite.executor.layers.attention.metadata import AttentionMetadata

DECODE_BACKENDS = ("cpu", "triton", "torch_grouped", "torch_padded")
PREFILL_BACKENDS = ("cpu", "torch")


@dataclass(frozen=True)
class AttentionConfig:
    """What the choice of backends depends on: fixed for a model, its KV cache and its device."""
    device: torch.device
    dtype: torch.dtype            # the model's, which the queries have
    cache_dtype: torch.dtype
    num_heads: int                # query heads (on this rank)
    num_kv_heads: int
    head_dim: int
    block_size: int
    decode: str | None = None     # a DECODE_BACKENDS name to use instead of the rules' choice
    prefill: str | None = None    # a PREFILL_BACKENDS name, likewise

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


def select_backends(config: AttentionConfig, has_decodes: bool,
                    has_prefills: bool) -> tuple[str | None, str | None]:
    """(decode backend, prefill backend) for a step; None for a kind of row it does not have."""
    decode = (config.decode or _decode_backend(config)) if has_decodes else None
    prefill = (config.prefill or _prefill_backend(config)) if has_prefills else None
    return decode, prefill


def _decode_backend(config: AttentionConfig) -> str:
    if config.device.type == "cpu":
        if not cpu.kernels_built():
            return "torch_grouped"
        return "cpu" if cpu.decode_supported(config) else "torch_padded"
    if config.device.type == "cuda" and triton.decode_supported(config.head_dim):
        return "triton"
    return "torch_padded"


def _prefill_backend(config: AttentionConfig) -> str:
    if config.device.type == "cpu" and cpu.kernels_built() and cpu.prefill_supported(config):
        return "cpu"
    return "torch"


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention for a flat batch of new tokens q/k/v [T, heads, head_dim] -> [T, heads, head_dim].

    Each new token attends to its sequence's context up to and including itself: full over the
    cached prefix, causal within this step's chunk. k/v must be in the cache already (write_kv).
    """
    if meta.num_decode_only:
        # meta.block_tables/seq_lens, which a CUDA graph's replay refills
        return _decode_rows(q, kv_cache, meta, meta.block_tables, meta.seq_lens,
                            meta.max_seq_len, scale)
    out = torch.empty_like(q)
    if meta.decode_seq_idx is not None:
        decoded = _decode_rows(q.index_select(0, meta.decode_token_idx), kv_cache, meta,
                               meta.decode_block_tables, meta.decode_seq_lens,
                               meta.decode_max_seq_len, scale)
        out.index_copy_(0, meta.decode_token_idx, decoded)
    if meta.prefill_backend == "cpu":
        cpu.prefill(q, kv_cache, meta.block_tables, meta.prefill_seqs, scale, out)
    elif meta.prefill_backend == "torch":
        torch_paged.prefill(q, k, v, kv_cache, meta.block_tables, meta.prefills, scale, out)
    return out


def _decode_rows(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                 scale: float) -> torch.Tensor:
    """The batch's one-new-token rows, q [Bd, H, D], by the backend build() chose for them."""
    backend = meta.decode_backend
    if backend == "cpu":
        return cpu.decode(q, kv_cache, block_tables, seq_lens, scale)
    if backend == "triton":
        return triton.decode(q, kv_cache, block_tables, seq_lens, max_seq_len, scale)
    if backend == "torch_grouped":
        return torch_paged.grouped_decode(q, kv_cache, meta.decode_plan, scale)
    assert backend == "torch_padded", backend
    return torch_paged.padded_decode(q, kv_cache, block_tables, seq_lens, max_seq_len, scale)
