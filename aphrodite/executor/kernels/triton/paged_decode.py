"""Decode attention on CUDA as a Triton kernel that reads K/V straight from the paged cache.

The torch path (layers/attention/torch_paged.padded_decode) gathers every sequence's whole
context into a new tensor each step; on a GPU that copy costs as much as the attention
itself. Here each program walks its sequence's block table and keeps an online softmax, so
K/V are read once and nothing is materialised. Long contexts are split across programs
(flash-decoding) and the partial results merged in torch, so a small batch still fills the
GPU. Imported only when layers/attention/triton.py serves a step (Triton needs a GPU);
tests/executor/test_gpu.py checks it against a float64 reference.

A sliding window (the new token at p sees positions > p - window) starts each row's context
at its window, so the splits cover at most `window` tokens and nothing older is read. A soft
cap turns the scaled scores s into cap * tanh(s / cap) (Gemma 2): tanh as 1 - 2 / (e^2x + 1),
since triton.language has no tanh on every Triton version (it is in libdevice, whose module
path moves between versions); e^2x overflowing to inf gives 1, underflowing to 0 gives -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS_PER_TILE = 64
TOKENS_PER_SPLIT = 512    # a program handles at most this many context tokens
MAX_SPLITS = 16


# Triton compiles a variant per integer argument that is or is not a multiple of 16. The
# block table's width changes from step to step in eager (mixed prefill + decode) steps, so
# without this each new kind of width would compile the kernel again while requests wait.
@triton.jit(do_not_specialize=["tables_stride"])
def _paged_decode_kernel(
        q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr,
        out_ptr, max_ptr, sum_ptr,
        scale, kv_stride, tables_stride, split_len, window, softcap,
        BLOCK_SIZE: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
        NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, WINDOWED: tl.constexpr,
        SOFTCAP: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    if WINDOWED:   # the first position the new token (at seq_len - 1) sees
        first = tl.maximum(seq_len - window, 0)
    else:
        first = 0
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, TILE)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + (row * KV_HEADS * GROUP + heads)[:, None] * HEAD_DIM + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)

    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile_start in range(start, end, TILE):
        pos = tile_start + n
        valid = pos < end
        block = tl.load(block_tables_ptr + row * tables_stride + pos // BLOCK_SIZE,
                        mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        offsets = (slot * KV_HEADS + kv_head)[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(cache_ptr + offsets, mask=valid[:, None], other=0.0)
        v = tl.load(cache_ptr + kv_stride + offsets, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        if SOFTCAP:
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A split with no valid token keeps max = -inf; guard the exp of (-inf) - (-inf).
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - safe_max)
        probs = tl.exp(scores - safe_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v,
                                                   input_precision=PRECISION).to(tl.float32)
        running_max = new_max

    part = (row * KV_HEADS * GROUP + heads) * NUM_SPLITS + split
    tl.store(out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < GROUP)[:, None])
    tl.store(max_ptr + part, running_max, mask=g < GROUP)
    tl.store(sum_ptr + part, running_sum, mask=g < GROUP)


def num_splits_for(max_seq_len: int) -> int:
    """A power of two, so eager steps use the variants CUDA-graph capture already compiled
    (NUM_SPLITS is a compile-time constant) instead of compiling up to 16 more."""
    wanted = -(-max_seq_len // TOKENS_PER_SPLIT)
    return min(MAX_SPLITS, triton.next_power_of_2(max(1, wanted)))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, max_seq_len: int, scale: float,
                           window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence) -> [B, H, D]; same contract as the torch path,
    window and softcap included.

    `max_seq_len` is a host int (the CUDA-graph bucket under capture), so the launch grid
    never depends on device data; with a window, no row reads more than min(max_seq_len,
    window) tokens, and the splits cover that many."""
    batch, heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    group = heads // kv_heads
    span = max_seq_len if window is None else min(max_seq_len, window)
    splits = num_splits_for(span)
    split_len = -(-span // splits)
    split_len = -(-split_len // TOKENS_PER_TILE) * TOKENS_PER_TILE
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    partial = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    maxes = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    _paged_decode_kernel[(batch, kv_heads, splits)](
        q, kv_cache, block_tables, seq_lens, partial, maxes, sums,
        scale, kv_cache.stride(0), block_tables.stride(0), split_len, window or 0,
        float(softcap or 0.0), BLOCK_SIZE=block_size, KV_HEADS=kv_heads, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        TILE=TOKENS_PER_TILE, NUM_SPLITS=splits, WINDOWED=window is not None,
        SOFTCAP=softcap is not None,
        # float32 models get exact float32 products, not TF32's 10-bit mantissa
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if splits == 1:
        return (partial[:, :, 0] / sums).to(q.dtype)
    # Merge the splits' online-softmax states; empty splits have max -inf and weigh zero.
    top = maxes.max(dim=-1, keepdim=True).values
    weights = torch.exp(maxes - top)
    total = (sums * weights).sum(-1, keepdim=True)
    out = (partial * weights[..., None]).sum(2) / total
    return out.to(q.dtype)
