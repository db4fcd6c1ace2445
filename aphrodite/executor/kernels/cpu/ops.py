"""Python wrappers of the CPU C++ kernels: each takes torch tensors and passes their pointers
and sizes to its kernel.

- paged_decode_attention.h: torch has no operator for attention over a paged cache. The torch
  path gathers each sequence's blocks into a padded copy and calls scaled_dot_product_attention
  per group of sequences, which on CPU is dominated by per-call overhead and copies. The
  kernel reads keys and values where they are.
- paged_prefill_attention.h: every prefill chunk of a step in one call, over the paged cache
  too (torch's flash kernel runs one sequence a call, its prefix gathered first).
- quantized_linear.h: GGUF blocks (Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) times float32
  activations (see layers/quantized.py for why not torch's weight-only kernels).
- amx_linear.h: Q4_1 matrices times many tokens (prefill chunks) on Intel AMX's
  bfloat16 tiles, with every float32 bit kept (weights and activations split into exact
  bfloat16 parts); only where amx_available().
- layer_ops.h: the elementwise steps between a layer's matrix products (residual add and RMS
  norm, rotary and the KV-cache write, the SiLU- and tanh-GELU-gated products), one call
  each (the layers of executor/layers/ call them).
- decode_layers.h: a whole decode step's layers for a model whose matrices are all
  quantised, in one call (see executor/models/).

The KV cache may be float32 or, with --kv-cache-dtype float16, IEEE float16 (kernels that
read it widen eight elements at a time with F16C; writes round to nearest even). Decode
attention also reads bfloat16 caches (bfloat16 models).

build.py compiles the kernels on first use (library_available() asks for them); without
them every function here but the predicates must not be called, and the torch paths run.
The entry points' types and the structures below come from kernel_abi.py.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

import torch

from aphrodite.executor.kernels.cpu import build, kernel_abi

# The kernels' codes for a KV cache's element type.
_KV_DTYPE_CODES = {getattr(torch, name): code
                   for name, code in kernel_abi.KV_DTYPE_CODES.items()}


@cache
def _library() -> ctypes.CDLL | None:
    return build.load_library()


def library_available() -> bool:
    """Whether the kernels built and loaded (the first call builds them)."""
    return _library() is not None


def float16_cache_supported() -> bool:
    """Whether the kernels read and write float16 caches (built with F16C: x86 CPUs since
    2012); without, float16 caches take the torch paths."""
    library = _library()
    return library is not None and bool(library.kv_float16_supported())


def cache_supported(kv_cache: torch.Tensor) -> bool:
    """Caches the prefill kernel, rotate_and_cache and the fused decode step take: float32,
    or float16 where float16_cache_supported()."""
    return kv_cache.dtype == torch.float32 or (kv_cache.dtype == torch.float16
                                               and float16_cache_supported())


def supports(kv_cache: torch.Tensor) -> bool:
    """Caches paged_decode_attention takes: those of cache_supported() and bfloat16, head_dim a
    multiple of 8 (others take the torch path)."""
    return ((kv_cache.dtype == torch.bfloat16 or cache_supported(kv_cache))
            and kv_cache.shape[-1] % 8 == 0)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """q [B, H, D] one new token per sequence -> [B, H, D], over each sequence's first
    seq_lens[b] cached tokens (this step's already written). kv_cache: one layer,
    [2, blocks, block_size, kv_heads, head_dim]; block_tables [B, max_blocks] int64.
    window: a sliding window (the new token at p sees positions > p - window; blocks wholly
    before it are not read); softcap: scores s become tanh(s / softcap) * softcap."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    batch, heads, _ = q.shape
    q32 = q.to(torch.float32).contiguous()
    out = torch.empty_like(q32)
    assert kv_cache.is_contiguous() and block_tables.dtype == seq_lens.dtype == torch.int64
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    _library().paged_decode_attention(
        q32.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        _KV_DTYPE_CODES[kv_cache.dtype], block_tables.data_ptr(), block_tables.shape[1],
        seq_lens.data_ptr(), batch, heads, kv_heads, head_dim, block_size, scale, window or 0,
        softcap or 0.0, out.data_ptr())
    return out.to(q.dtype)


# Query heads per kv head that a prefill tile holds at least one token of.
PREFILL_TILE_ROWS = kernel_abi.PREFILL_TILE_ROWS


def supports_prefill(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Prefills paged_prefill_attention takes: float32 queries, a cache of cache_supported(),
    head_dim a multiple of 8, at most PREFILL_TILE_ROWS query heads per kv head, each token's
    heads contiguous."""
    heads, head_dim = q.shape[1], q.shape[2]
    return (q.dtype == torch.float32 and cache_supported(kv_cache) and head_dim % 8 == 0
            and heads // kv_cache.shape[3] <= PREFILL_TILE_ROWS
            and q.stride(2) == 1 and q.stride(1) == head_dim)


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seqs: torch.Tensor, scale: float, out: torch.Tensor,
                            window: int | None = None, softcap: float | None = None) -> None:
    """Causal attention of every prefill chunk over its context in the cache (this step's
    keys and values already written). q [T, H, D] (rows may be strided); out [T, H, D]
    contiguous, only the prefill tokens' rows written; seqs [n, 4] int64: block-table row,
    first token in the batch, new tokens, context length after the step. window, softcap: as
    for paged_decode_attention."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    assert kv_cache.is_contiguous() and out.is_contiguous() and seqs.is_contiguous()
    assert block_tables.is_contiguous() and block_tables.dtype == seqs.dtype == torch.int64
    _library().paged_prefill_attention(
        q.data_ptr(), q.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        int(kv_cache.dtype == torch.float16), block_tables.data_ptr(), block_tables.shape[1],
        seqs.data_ptr(), seqs.shape[0], q.shape[1], kv_heads, head_dim, block_size, scale,
        window or 0, softcap or 0.0, out.data_ptr())


def quantized_linear(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """x [tokens, cols] float32 @ W^T -> [tokens, rows] float32. blocks: W as uint8
    [rows, bytes per row], GGUF blocks of ggml_type (a GGML type code; quantized_linear.h lists
    those the kernels know). out: where to write, a [tokens, rows] float32 view whose rows may
    be further apart than rows (columns of a wider result); new if None. ValueError for a type
    the kernels do not know."""
    x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], blocks.shape[0], dtype=torch.float32)
    assert x.dtype == torch.float32 and blocks.dtype == torch.uint8 and blocks.is_contiguous()
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], blocks.shape[0]) \
        and out.stride(1) == 1
    if _library().quantized_linear(x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(),
                                   ggml_type, blocks.shape[0], out.stride(0), out.data_ptr()):
        raise ValueError(f"the CPU kernels do not multiply GGML type {ggml_type}")
    return out


@cache
def amx_available() -> bool:
    """Whether amx_linear runs here: a build for a CPU with AMX (bfloat16 tiles) and a kernel
    that grants this process the tile state. APHRODITE_AMX=0 turns it off."""
    library = _library()
    if library is None or os.environ.get("APHRODITE_AMX", "1") == "0":
        return False
    return bool(library.amx_enable())


def amx_pack(blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """Q4_1 blocks (quantized_linear's layout) of a [rows, cols] matrix, rows and cols
    multiples of 32 -> amx_linear's operand tiles (int16 storage of bfloat16 parts, 4 bytes
    a weight; see amx_linear.h)."""
    rows = blocks.shape[0]
    assert blocks.dtype == torch.uint8 and blocks.is_contiguous() and rows % 32 == 0 \
        and cols % 32 == 0
    out = torch.empty(_library().amx_packed_size(rows, cols), dtype=torch.int16)
    _library().amx_pack(blocks.data_ptr(), rows, cols, out.data_ptr())
    return out


def amx_linear(x: torch.Tensor, packed: torch.Tensor, rows: int) -> torch.Tensor:
    """x [tokens, cols] float32 @ W^T -> [tokens, rows] float32, W packed by amx_pack; only
    where amx_available()."""
    x = x.contiguous()
    # Also what asks Linux for the tile state in this process: without it, AMX instructions
    # fault (SIGILL).
    assert amx_available() and x.dtype == torch.float32 and x.dim() == 2
    tokens = x.shape[0]
    out = torch.empty((tokens + 31) // 32 * 32, rows, dtype=torch.float32)
    _library().amx_linear(x.data_ptr(), tokens, x.shape[1], packed.data_ptr(), rows,
                          out.data_ptr())
    return out[:tokens]


def dequantize_blocks(blocks: torch.Tensor, ggml_type: int, cols: int) -> torch.Tensor:
    """The float32 [rows, cols] matrix of quantized_linear's blocks (bit for bit gguf's
    dequantisation). ValueError for a type the kernels do not know."""
    out = torch.empty(blocks.shape[0], cols, dtype=torch.float32)
    assert blocks.dtype == torch.uint8 and blocks.is_contiguous()
    if _library().dequantize_blocks(blocks.data_ptr(), ggml_type, blocks.shape[0], cols,
                                    out.data_ptr()):
        raise ValueError(f"the CPU kernels do not dequantise GGML type {ggml_type}")
    return out


# ---------------------------------------------------------------------------------------------
# A layer's elementwise steps (layer_ops.h): float32, contiguous tensors only.

def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x [rows, size] += delta (in place, when given); returns rms_norm(x) * weight."""
    assert x.is_contiguous() and (delta is None or delta.is_contiguous())
    out = torch.empty_like(x)
    _library().add_rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(),
                            weight.data_ptr(), x.shape[0], x.shape[1], eps, out.data_ptr())
    return out


def rotate_and_cache(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                     slots: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """qkv [tokens, heads + 2 * kv_heads, head_dim]: q and k heads rotated in place by cos/sin
    [tokens, head_dim]; token t's k and v stored in cache slot slots[t] (< 0: not stored).
    kv_cache: one of cache_supported()."""
    tokens, all_heads, head_dim = qkv.shape
    assert qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    assert kv_cache.is_contiguous() and slots.dtype == torch.int64 and slots.is_contiguous()
    _library().rotate_and_cache(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                                tokens, heads, (all_heads - heads) // 2, head_dim,
                                kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
                                int(kv_cache.dtype == torch.float16))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2 * inter] -> silu(gate) * up [rows, inter]."""
    assert gate_up.is_contiguous()
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    _library().silu_and_mul(gate_up.data_ptr(), rows, inter, out.data_ptr())
    return out


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2 * inter] -> gelu(gate, tanh approximation) * up [rows, inter]."""
    assert gate_up.is_contiguous()
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    _library().gelu_tanh_and_mul(gate_up.data_ptr(), rows, inter, out.data_ptr())
    return out


# ---------------------------------------------------------------------------------------------
# Decode layers (decode_layers.h): the structures' fields are kernel_abi.py's STRUCTS.

MatrixSegment = kernel_abi.STRUCTURES["MatrixSegment"]
QuantizedMatrix = kernel_abi.STRUCTURES["QuantizedMatrix"]
DecodeLayerWeights = kernel_abi.STRUCTURES["DecodeLayerWeights"]
DecodeStep = kernel_abi.STRUCTURES["DecodeStep"]


def decode_layers(layers: ctypes.Array, step: DecodeStep) -> None:
    """Every layer of one decode step, in place on step.hidden (all pointers must stay valid
    for the call)."""
    _library().decode_layers(ctypes.addressof(layers), len(layers), ctypes.addressof(step))
