"""C++ kernels for the CPU path, compiled on first use and cached; torch fallbacks without them.

- kernels/paged_decode_attention.h: torch has no operator for attention over a paged cache.
  The torch path gathers each sequence's blocks into a padded copy and calls
  scaled_dot_product_attention per group of sequences, which on CPU is dominated by per-call
  overhead and copies. The kernel reads keys and values where they are. Decode, one layer of
  the default model: see the table in attention.py.
- kernels/paged_prefill_attention.h: every prefill chunk of a step in one call, over the
  paged cache too (torch's flash kernel runs one sequence a call, its prefix gathered first).
- kernels/quantized_linear.h: GGUF-style int4/int8 weights times float32 activations for
  decode (see quantized_linear.py for why not torch's weight-only kernels).
- kernels/amx_linear.h: the same int4 matrices times many tokens (prefill chunks) on Intel
  AMX's bfloat16 tiles, with every float32 bit kept (weights and activations split into
  exact bfloat16 parts); only where amx_available().
- kernels/layer_ops.h: the elementwise steps between a layer's matrix products (residual add
  and RMS norm, rotary and the KV-cache write, the SiLU-gated product), one call each (see
  models/layer_ops.py).
- kernels/decode_layers.h: a whole decode step's layers for a model whose matrices are all
  quantised, in one call (see models/llama.py).

The KV cache may be float32 or, with --kv-cache-dtype float16, IEEE float16 (kernels that
read it widen eight elements at a time with F16C; writes round to nearest even). Decode
attention also reads bfloat16 caches (bfloat16 models).

kernels/cpu_kernels.cpp includes them all and holds the C entry points. It is built with the
system's g++ (-O3 -march=native -fopenmp) into <cache_root>/kernels/cpu_kernels-<hash>.so,
keyed by the sources, the compiler, the flags and this CPU's feature flags, so a cache shared
between machines never hands one a build for another. No compiler, or a failed build, logs a
warning once and leaves the torch paths in use; APHRODITE_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch

from aphrodite.model_files import cache_root, write_file_atomically

logger = logging.getLogger("aphrodite.worker")

KERNELS = Path(__file__).parent
SOURCES = sorted([*KERNELS.glob("*.cpp"), *KERNELS.glob("*.h")])   # what the build key covers
# gnu++17, not c++17: the strict ISO mode stops g++ from fusing multiply-adds.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu++17"]
# The kernels' codes for a KV cache's element type (KvDtype in cpu_kernels.cpp).
_KV_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), version, " ".join(FLAGS),
                                    _cpu_flags()]).encode()).hexdigest()[:32]
    target = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
    if target.exists():
        return target

    def compile_to(path: str) -> None:
        subprocess.run([compiler, *FLAGS, str(KERNELS / "cpu_kernels.cpp"), "-o", path],
                       capture_output=True, text=True, check=True)

    if not write_file_atomically(target, compile_to):
        raise OSError(f"cannot write {target.parent}")
    logger.info("Built the CPU kernels into %s", target)
    return target


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("APHRODITE_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        logger.warning("No C++ compiler (g++) found: CPU decode attention and quantised linears "
                       "run the slower torch paths")
        return None
    try:
        # torch has loaded its libgomp.so.1 already; the kernel's libgomp.so.1 resolves to it.
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("Could not build the CPU kernels (%s): CPU decode attention and "
                       "quantised linears run the slower torch paths", detail.strip()[-500:])
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.paged_decode_attention.argtypes = [
        pointer, pointer, pointer, ctypes.c_int, pointer, i64, pointer, i64, i64, i64, i64, i64,
        ctypes.c_float, pointer]
    library.paged_decode_attention.restype = None
    library.paged_prefill_attention.argtypes = [
        pointer, i64, pointer, pointer, ctypes.c_int, pointer, i64, pointer, i64, i64, i64, i64,
        i64, ctypes.c_float, pointer]
    library.paged_prefill_attention.restype = None
    library.quantized_linear.argtypes = [pointer, i64, i64, pointer, ctypes.c_int, i64, pointer]
    library.quantized_linear.restype = None
    library.dequantize_blocks.argtypes = [pointer, ctypes.c_int, i64, i64, pointer]
    library.dequantize_blocks.restype = None
    library.decode_layers.argtypes = [pointer, i64, pointer]
    library.decode_layers.restype = None
    library.add_rms_norm.argtypes = [pointer, pointer, pointer, i64, i64, ctypes.c_float, pointer]
    library.add_rms_norm.restype = None
    library.rotate_and_cache.argtypes = [pointer, pointer, pointer, pointer, i64, i64, i64, i64,
                                         pointer, pointer, ctypes.c_int]
    library.rotate_and_cache.restype = None
    library.silu_and_mul.argtypes = [pointer, i64, i64, pointer]
    library.silu_and_mul.restype = None
    library.amx_enable.argtypes = []
    library.amx_enable.restype = ctypes.c_int
    library.amx_packed_size.argtypes = [i64, i64]
    library.amx_packed_size.restype = i64
    library.amx_pack.argtypes = [pointer, i64, i64, pointer]
    library.amx_pack.restype = None
    library.amx_linear.argtypes = [pointer, i64, i64, pointer, i64, pointer]
    library.amx_linear.restype = None
    library.kv_float16_supported.argtypes = []
    library.kv_float16_supported.restype = ctypes.c_int
    return library


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
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] one new token per sequence -> [B, H, D], over each sequence's first
    seq_lens[b] cached tokens (this step's already written). kv_cache: one layer,
    [2, blocks, block_size, kv_heads, head_dim]; block_tables [B, max_blocks] int64."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    batch, heads, _ = q.shape
    q32 = q.to(torch.float32).contiguous()
    out = torch.empty_like(q32)
    assert kv_cache.is_contiguous() and block_tables.dtype == seq_lens.dtype == torch.int64
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    _library().paged_decode_attention(
        q32.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        _KV_DTYPE_CODES[kv_cache.dtype], block_tables.data_ptr(), block_tables.shape[1],
        seq_lens.data_ptr(), batch, heads, kv_heads, head_dim, block_size, scale, out.data_ptr())
    return out.to(q.dtype)


# Query heads per kv head that a prefill tile holds at least one token of (kTileRows).
PREFILL_TILE_ROWS = 48


def supports_prefill(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Prefills paged_prefill_attention takes: float32 queries, a cache of cache_supported(),
    head_dim a multiple of 8, at most PREFILL_TILE_ROWS query heads per kv head, each token's
    heads contiguous."""
    heads, head_dim = q.shape[1], q.shape[2]
    return (q.dtype == torch.float32 and cache_supported(kv_cache) and head_dim % 8 == 0
            and heads // kv_cache.shape[3] <= PREFILL_TILE_ROWS
            and q.stride(2) == 1 and q.stride(1) == head_dim)


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seqs: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Causal attention of every prefill chunk over its context in the cache (this step's
    keys and values already written). q [T, H, D] (rows may be strided); out [T, H, D]
    contiguous, only the prefill tokens' rows written; seqs [n, 4] int64: block-table row,
    first token in the batch, new tokens, context length after the step."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    assert kv_cache.is_contiguous() and out.is_contiguous() and seqs.is_contiguous()
    assert block_tables.is_contiguous() and block_tables.dtype == seqs.dtype == torch.int64
    _library().paged_prefill_attention(
        q.data_ptr(), q.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        int(kv_cache.dtype == torch.float16), block_tables.data_ptr(), block_tables.shape[1],
        seqs.data_ptr(), seqs.shape[0], q.shape[1], kv_heads, head_dim, block_size, scale,
        out.data_ptr())


def quantized_linear(x: torch.Tensor, blocks: torch.Tensor, is_int4: bool) -> torch.Tensor:
    """x [tokens, cols] float32 @ W^T -> [tokens, rows] float32. blocks: W as uint8
    [rows, cols / 32 * block bytes], GGUF's Q4_1 blocks (is_int4) or Q8_0 blocks (see
    kernels/quantized_linear.h)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], blocks.shape[0], dtype=torch.float32)
    assert x.dtype == torch.float32 and blocks.dtype == torch.uint8 and blocks.is_contiguous()
    _library().quantized_linear(x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(),
                                int(is_int4), blocks.shape[0], out.data_ptr())
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
    a weight; see kernels/amx_linear.h)."""
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


def dequantize_blocks(blocks: torch.Tensor, is_int4: bool, cols: int) -> torch.Tensor:
    """The float32 [rows, cols] matrix of quantized_linear's blocks (bit for bit gguf's
    dequantisation)."""
    out = torch.empty(blocks.shape[0], cols, dtype=torch.float32)
    assert blocks.dtype == torch.uint8 and blocks.is_contiguous()
    _library().dequantize_blocks(blocks.data_ptr(), int(is_int4), blocks.shape[0], cols,
                                 out.data_ptr())
    return out


# ---------------------------------------------------------------------------------------------
# A layer's elementwise steps (kernels/layer_ops.h): float32, contiguous tensors only.

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


# ---------------------------------------------------------------------------------------------
# Decode layers (kernels/decode_layers.h): the structures mirror the C++ ones field by field.

class QuantizedMatrix(ctypes.Structure):
    _fields_ = [("blocks", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("is_int4", ctypes.c_int64)]


class DecodeLayerWeights(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("qkv", QuantizedMatrix), ("o", QuantizedMatrix), ("gate_up", QuantizedMatrix),
                ("down", QuantizedMatrix), ("kv_cache", ctypes.c_void_p)]


class DecodeStep(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("slots", ctypes.c_void_p), ("block_tables", ctypes.c_void_p),
                ("seq_lens", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in (
                    "tokens", "hidden_size", "heads", "kv_heads", "head_dim", "block_size",
                    "max_blocks", "cache_half", "kv_f16")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def decode_layers(layers: ctypes.Array, step: DecodeStep) -> None:
    """Every layer of one decode step, in place on step.hidden (all pointers must stay valid
    for the call)."""
    _library().decode_layers(ctypes.addressof(layers), len(layers), ctypes.addressof(step))
