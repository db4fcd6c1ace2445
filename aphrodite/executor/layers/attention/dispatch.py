"""paged_attention: every layer's attention, by the backends the step's metadata names."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from aphrodite.executor.layers.attention import cpu, torch_paged, triton

if TYPE_CHECKING:
    from aphrodite.executor.layers.attention.metadata import AttentionMetadata


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Attention for a flat batch of new tokens q/k/v [T, heads, head_dim] -> [T, heads, head_dim].

    Each new token attends to its sequence's context up to and including itself: full over the
    cached prefix, causal within this step's chunk. k/v must be in the cache already (write_kv).
    window: this layer's sliding window; a token at position p then sees positions > p - window
    only (transformers' sliding_window_overlay). softcap: scores become tanh(s / cap) * cap
    before the mask and softmax (Gemma 2). Every backend applies both.
    """
    if meta.num_decode_only:
        # meta.block_tables/seq_lens, which a CUDA graph's replay refills
        return _decode_rows(q, kv_cache, meta, meta.block_tables, meta.seq_lens,
                            meta.max_seq_len, scale, window, softcap)
    out = torch.empty_like(q)
    if meta.decode_seq_idx is not None:
        decoded = _decode_rows(q.index_select(0, meta.decode_token_idx), kv_cache, meta,
                               meta.decode_block_tables, meta.decode_seq_lens,
                               meta.decode_max_seq_len, scale, window, softcap)
        out.index_copy_(0, meta.decode_token_idx, decoded)
    if meta.prefill_backend == "cpu":
        cpu.prefill(q, kv_cache, meta.block_tables, meta.prefill_seqs, scale, out, window,
                    softcap)
    elif meta.prefill_backend == "torch":
        torch_paged.prefill(q, k, v, kv_cache, meta.block_tables, meta.prefills, scale, out,
                            window, softcap)
    return out


def _decode_rows(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                 scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """The batch's one-new-token rows, q [Bd, H, D], by the backend build() chose for them."""
    backend = meta.decode_backend
    if backend == "torch_grouped":
        return torch_paged.grouped_decode(q, kv_cache, meta.decode_plan, scale, window, softcap)
    if backend == "torch_padded":
        return torch_paged.padded_decode(q, kv_cache, block_tables, seq_lens, max_seq_len,
                                         scale, window, softcap)
    if backend == "cpu":
        return cpu.decode(q, kv_cache, block_tables, seq_lens, scale, window, softcap)
    assert backend == "triton", backend
    return triton.decode(q, kv_cache, block_tables, seq_lens, max_seq_len, scale, window,
                         softcap)
