"""Linear layers y = x W^T + b: which kernel runs, decided in this file and nowhere else.

A weight's format is chosen once, at load time; each call then picks its kernel from that
format and the call's token count (rows of x):

    weight holds                      kernel per call
    float32 on CPU, packed for oneDNN   oneDNN
    bfloat16 on a CPU emulating bf16    torch's bf16 GEMM below UPCAST_BF16_FROM_TOKENS,
                                        else a float32 upcast in slices
    any other plain tensor              F.linear (MKL for CPU float32; a GPU's own GEMM)
    GGUF blocks (C++ kernels)           cpu_kernels.quantized_linear up to DENSE_ABOVE_TOKENS,
                                        then dequantised per call
      + a float32 copy                  the copy (F.linear, MKL) above DENSE_ABOVE_TOKENS
      + AMX tiles (Q4_1)                cpu_kernels.amx_linear above AMX_ABOVE_TOKENS
    torch's int4 layout (no C++)        torch's int4 kernel up to TORCH_INT4_DENSE_ABOVE_TOKENS,
                                        then dequantised per call

Load-time choices: float32 CPU matrices are packed for oneDNN (prepare_weight); quantised
matrices hold GGUF blocks where the C++ kernels build, else torch's int4 layout
(quantized_weight); the loader's "int4+dense" mode adds AMX tiles or a float32 copy
(add_large_call_operand). A decode step whose matrices all hold GGUF blocks runs every layer
in one C++ call (models/fused_decode.py), up to FUSED_DECODE_MAX_TOKENS sequences when
float32 copies exist (runs_fused_decode).

Figures: all linears of the default model (30 layers, 2 threads, AVX2 unless said), ms per
call, as benchmarks/step_profile.py reports them under forward.linear. Packing float32 for oneDNN pays
at decode sizes: 20.3 ms packed at 4 tokens, 55.6 through MKL.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.quantized import Q4_1, QuantizedParts, QuantizedWeight

# oneDNN's blocked layout is tuned for this many rows of input: within noise of the call's
# real row count from 1 to 2048 tokens, where a hint of 1 is 1.5x slower at 4-16 tokens
# (step_profile.py --batch 4).
PACK_FOR_TOKENS = 64
# Emulated bf16 GEMM against upcasting the weight to float32: 128 vs 81 ms at 8 tokens
# (step_profile.py --dtype bfloat16 --batch 8). Fewer tokens do not amortise the upcast's
# full read and write of the weight.
UPCAST_BF16_FROM_TOKENS = 8
# A whole float32 copy of a large matrix is freshly mapped and faulted in by every call:
# lm_head at 64 tokens takes 33 ms in 4 MB slices, 90 ms whole (step_profile.py --dtype
# bfloat16 --batch 64, under logits).
UPCAST_SLICE_BYTES = 4 << 20
# Calls of up to this many tokens multiply the GGUF blocks; larger ones the float32 copy where
# there is one, else the matrix dequantised per call. Up to here the C++ kernel is at least as
# fast as MKL on the copy while reading 0.6-1.1 bytes a weight instead of 4: 185 vs 197 ms at
# 128 tokens (step_profile.py --batch 128).
DENSE_ABOVE_TOKENS = 128
# Above this many tokens torch's int4 kernel is 1.3-2x slower than dequantising per call (the
# default model's matrices timed call by call: no benchmark script runs torch's int4 kernel
# with batches, since auto never picks it).
TORCH_INT4_DENSE_ABOVE_TOKENS = 16
# AMX tiles are read at 4 bytes a weight but multiply at 1.5x float32's peak: the default
# model's 30 layers of matrices at 96 tokens take 45.8 ms on the tiles, 68.4 on the blocks
# (Xeon with AMX, step_profile.py --batch 96).
AMX_ABOVE_TOKENS = 64
# With float32 copies at hand, a fused decode step of 64 sequences takes 150 ms, layer by
# layer 172-184 ms; larger steps run layer by layer (step_profile.py --batch 64).
FUSED_DECODE_MAX_TOKENS = 64

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


@cache
def bf16_gemm_is_emulated() -> bool:
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ---------------------------------------------------------------------------------------------
# Per call


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for 2-D x [tokens, in], with the kernel choose_kernel picks."""
    return choose_kernel(weight, x.shape[0])(x, weight, bias)


def choose_kernel(weight: torch.Tensor, tokens: int) -> Kernel:
    """The kernel a call of `tokens` rows on `weight` runs (the table in the module docstring)."""
    if type(weight) is QuantizedWeight:
        if weight.amx is not None and tokens > AMX_ABOVE_TOKENS:
            return _amx
        if tokens > DENSE_ABOVE_TOKENS:
            return _dense_copy if weight.dense is not None else _dequantized
        if weight.segments:
            return _gguf_blocks
        if weight.packed is not None and tokens <= TORCH_INT4_DENSE_ABOVE_TOKENS:
            return _torch_int4
        return _dequantized
    if weight.is_mkldnn:
        return _onednn
    if (weight.dtype == torch.bfloat16 and tokens >= UPCAST_BF16_FROM_TOKENS
            and weight.device.type == "cpu" and bf16_gemm_is_emulated()):
        return _bf16_upcast
    return F.linear


def runs_fused_decode(weight: torch.Tensor, tokens: int) -> bool:
    """Whether a decode step of `tokens` sequences runs every layer in one C++ call
    (models/fused_decode.py), for a model whose matrices are all held like `weight`: that
    call multiplies GGUF blocks."""
    return (type(weight) is QuantizedWeight and weight.blocks is not None
            and (weight.dense is None or tokens <= FUSED_DECODE_MAX_TOKENS))


def _onednn(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _bf16_upcast(x, weight, bias):
    # A slice of rows at a time (UPCAST_SLICE_BYTES). bf16 products are exact in float32 and
    # both this and the bf16 GEMM accumulate in float32, so the arithmetic matches.
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    rows = max(1, UPCAST_SLICE_BYTES // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        out[:, part] = F.linear(x32, weight[part].float(),
                                None if bias is None else bias[part].float())
    return out


def _gguf_blocks(x, weight, bias):
    out = weight.blocks_linear(x.float()).to(x.dtype)
    return out if bias is None else out + bias


def _torch_int4(x, weight, bias):
    out = weight.torch_int4_linear(x.float()).to(x.dtype)
    return out if bias is None else out + bias


def _amx(x, weight, bias):
    out = weight.amx_linear(x)
    return out if bias is None else out + bias


def _dense_copy(x, weight, bias):
    return F.linear(x, weight.dense, bias)


def _dequantized(x, weight, bias):
    return F.linear(x, weight.dequantize(), bias)


# ---------------------------------------------------------------------------------------------
# At load time


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 [out, in] CPU weight in oneDNN's layout (only linear() can use the result)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_FOR_TOKENS)


def packs_for_onednn(weight: torch.Tensor) -> bool:
    return (type(weight) is not QuantizedWeight and weight.dtype == torch.float32
            and weight.device.type == "cpu" and onednn_available())


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """A loaded matrix in the format linear() multiplies it in: packed for oneDNN where
    packs_for_onednn, else as it is."""
    return pack_weight(weight.detach()) if packs_for_onednn(weight) else weight


def uses_gguf_blocks() -> bool:
    """Whether quantised matrices keep GGUF blocks for the C++ kernels (where they build);
    otherwise Q4 takes torch's int4 layout and the other types have no kernel (torch's int8
    kernel takes one scale per row, GGUF one per block of 32)."""
    return cpu_kernels.library_available()


def quantized_weight(parts: QuantizedParts | list[QuantizedParts]) -> QuantizedWeight:
    """A matrix, or a stacked one's parts in row order, as the kernels here multiply it."""
    return QuantizedWeight(parts, gguf_blocks=uses_gguf_blocks())


def add_large_call_operand(weight: QuantizedWeight) -> None:
    """What calls of many tokens multiply, for the loader's "int4+dense" mode: AMX tiles for
    Q4_1 matrices where the CPU has AMX (as accurate as float32), else a plain float32 copy.
    The copy is not packed for oneDNN: above DENSE_ABOVE_TOKENS MKL is the faster one
    (2048 tokens: 2489 ms against 2749)."""
    if (weight.ggml_type == Q4_1 and weight.out_features % 32 == 0
            and cpu_kernels.amx_available()):
        weight.amx = cpu_kernels.amx_pack(weight.blocks, weight.in_features)
    else:
        weight.dense = weight.dequantize()
