"""The torch backends: attention over the paged cache from torch operators, on any device.

They gather a sequence's blocks into a contiguous copy and attend over it; what they gather
is cast to the queries' dtype (a float16 cache under a float32 model).

- padded_decode: every decode row's context gathered in one go, padded to the longest and
  masked. Its shapes depend only on the batch size and max_seq_len, which CUDA graphs fix,
  so it is what a captured graph replays where the Triton kernel is not used.
- grouped_decode: decode on CPU without the C++ kernels. Rows sorted by length are cut into
  groups of bounded padded size (metadata.plan_decode_groups); each group gathers only its
  own blocks and runs one fused scaled_dot_product_attention. A single padded gather's copy
  grows with the spread of lengths, and on CPU its buffers of tens of MB are mapped and
  faulted in afresh by every layer.
- prefill: torch's scaled_dot_product_attention per sequence, over a gathered copy of any
  cached prefix.

Each takes a layer's sliding window (a token at position p sees positions > p - window) as
part of its mask, and a soft cap on the scores (tanh(s / cap) * cap, Gemma 2), which SDPA has
no room for: with one, attend() computes the scores itself. The cache still holds every token;
a window only masks the older ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from aphrodite.executor.layers.attention.kv_cache import gather_context
from aphrodite.executor.layers.linear import bf16_gemm_is_emulated

if TYPE_CHECKING:
    from aphrodite.executor.layers.attention.metadata import DecodePlan, PrefillSeq


def padded_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, max_seq_len: int, scale: float,
                  window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One new token per sequence: q [B, H, D] over each sequence's whole cached context."""
    batch, heads, head_dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = heads // kv_heads
    num_blocks = -(-max_seq_len // block_size)
    keys = gather_context(kv_cache[0], block_tables, num_blocks).to(q.dtype)   # [B, S, KVH, D]
    values = gather_context(kv_cache[1], block_tables, num_blocks).to(q.dtype)
    # GQA without copying K/V per query head: a group of query heads shares one K/V head.
    qg = q.view(batch, kv_heads, group, head_dim)
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float().mul_(scale)  # [B, KVH, G, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap).mul_(softcap)
    # Recomputed by every layer from seq_lens (no state kept on meta), so a captured CUDA graph
    # replays it from the refilled seq_lens buffer.
    positions = torch.arange(keys.shape[1], device=q.device)[None, :]
    beyond = positions >= seq_lens[:, None]                                # [B, S]
    if window is not None:   # the new token sits at seq_len - 1
        beyond |= positions <= seq_lens[:, None] - 1 - window
    scores.masked_fill_(beyond[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3))                  # [B, KVH, G, D]
    return out.reshape(batch, heads, head_dim)


def grouped_decode(q: torch.Tensor, kv_cache: torch.Tensor, plan: DecodePlan, scale: float,
                   window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One new token per sequence, q [B, H, D]; each length group gathers only its own blocks."""
    _, block_size, kv_heads, head_dim = kv_cache.shape[1:]
    if plan.order is not None:
        q = q.index_select(0, plan.order)
    outs = []
    for group in plan.groups:
        n, width = group.end - group.start, group.num_blocks * block_size
        # [n * blocks, block_size, KVH, D] -> [n, KVH, width, D] as a strided view (no copy)
        keys = kv_cache[0].index_select(0, group.block_ids).view(n, width, kv_heads, head_dim)
        values = kv_cache[1].index_select(0, group.block_ids).view(n, width, kv_heads, head_dim)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        visible = group.visible
        if window is not None:   # the new token sits at seq_len - 1
            positions = torch.arange(width, device=q.device)
            visible = visible & (positions > group.seq_lens - 1 - window)
        outs.append(attend(
            q[group.start:group.end].unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
            visible, scale, softcap).squeeze(2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if plan.order is None:
        return out
    return torch.empty_like(out).index_copy_(0, plan.order, out)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            block_tables: torch.Tensor, prefills: list[PrefillSeq], scale: float,
            out: torch.Tensor, window: int | None = None, softcap: float | None = None) -> None:
    """Writes each prefill sequence's rows of out [T, H, D], one SDPA call a sequence."""
    for seq in prefills:
        span = slice(seq.token_start, seq.token_end)
        out[span] = _prefill_sequence(q[span], k[span], v[span], kv_cache,
                                      block_tables[seq.index], seq.seq_len, scale, window,
                                      softcap)


def _prefill_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      block_table: torch.Tensor, seq_len: int, scale: float,
                      window: int | None, softcap: float | None) -> torch.Tensor:
    """One sequence's chunk of L new tokens q/k/v [L, *, D] on top of seq_len - L cached ones."""
    new = q.shape[0]
    prefix = seq_len - new
    if prefix == 0:  # nothing cached: the chunk's own keys are the whole context
        keys, values, mask = k, v, None
    else:
        num_blocks = -(-seq_len // kv_cache.shape[2])
        keys = gather_context(kv_cache[0], block_table, num_blocks)[:seq_len].to(q.dtype)
        values = gather_context(kv_cache[1], block_table, num_blocks)[:seq_len].to(q.dtype)
    if prefix or window is not None or softcap is not None:
        # query i sits at position prefix + i and sees positions 0 ..= prefix + i (with a
        # window: those > prefix + i - window)
        rows = torch.arange(new, device=q.device)[:, None] + prefix
        columns = torch.arange(seq_len, device=q.device)[None, :]
        mask = columns <= rows
        if window is not None:
            mask &= columns > rows - window
    # Batched (4-D) inputs: torch's CPU flash kernel takes no others, and 3-D ones fall back
    # to the math path (2048-token causal prefill, default model's heads: 44 ms a layer
    # batched, 299 ms in 3-D).
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, keys, values))
    if mask is None:
        out = sdpa(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
    else:
        out = attend(q4, k4, v4, mask, scale, softcap)
    return out[0].transpose(0, 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
           scale: float, softcap: float | None) -> torch.Tensor:
    """q [B, H, L, D] over k/v [B, KVH, S, D] where `visible` (broadcast to [B, H, L, S]) is
    True: SDPA, or with a soft cap the scores computed here, softmax in float32 as
    transformers' eager attention does."""
    if softcap is None:
        return sdpa(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.float().masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA; bf16 on a CPU that emulates bf16 arithmetic runs in float32 instead.

    Decode, 16 sequences x 128 tokens, default model's heads, 2 threads, AMD EPYC (AVX2):
    0.30 ms upcast (the float32 copies included), 1.41 ms in bf16.
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and bf16_gemm_is_emulated():
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
