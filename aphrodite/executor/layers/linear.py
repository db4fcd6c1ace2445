"""Linear layers on CPU: which matrix-multiply kernel runs, chosen from measurements.

Float32: each weight is packed once, at load time, into oneDNN's blocked layout and multiplied
with oneDNN's kernel. The layouts plain torch offers go through MKL, and MKL is at its worst on
the small token counts of decode. Whole default model (30 layers + lm_head), 2 threads, AMD
EPYC (AVX2), ms per call. Column-major is the layout the model used before packing:

    tokens          1      4     16     64    128    512   2048
    column-major  17.6   55.6   71.7  144.6  250    836   3285
    oneDNN packed 15.8   20.3   42.2  117.2  222    880   3529

Decode batches are faster at every size; long prefills lose 5-7%. GGUF models' float32 copies
(quantized_linear.py) are left plain for MKL: the quantised kernel takes every call of up to
KERNEL_MAX_TOKENS tokens, so the copy serves only prefill chunks, where MKL is the faster.
On CPUs with AMX, int4 matrices hold AMX operand tiles instead of the copy, and calls above
AMX_ABOVE_TOKENS run kernels/amx_linear.h, as accurate as float32 and 1.4x MKL's speed at
prefill sizes.

bfloat16 on a CPU without native bf16 dot products (AVX2 and older): torch emulates the bf16
GEMM. From 8 tokens on, upcasting the weight to float32 per call, in 4 MB slices, is faster
(all linears, ms per call: 128 vs 81 at 8 tokens, 900 vs 182 at 64; 17 vs 69 at 1 token).
Memory use stays that of bf16, and the arithmetic matches: bf16 products are exact in float32,
and both paths accumulate in float32.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.quantized import (AMX_ABOVE_TOKENS, KERNEL_MAX_TOKENS,
                                                 QuantizedWeight)

# oneDNN picks its blocked layout for this many rows of input. Measured with hints 1, 64 and the
# real row count: 64 is within noise of the real count from 1 to 2048 tokens; 1 is 1.5x slower
# at 4-16 tokens.
PACK_FOR_TOKENS = 64

# Emulated bf16 GEMM is still the faster one for a handful of tokens: upcasting costs a full read
# and write of the weight, which one GEMV does not amortise.
UPCAST_BF16_FROM_TOKENS = 8
UPCAST_SLICE_BYTES = 4 << 20


@cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


@cache
def bf16_gemm_is_emulated() -> bool:
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 [out, in] CPU weight in oneDNN's layout (only linear() can use the result)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_FOR_TOKENS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for 2-D x, with the kernel choices above."""
    if type(weight) is QuantizedWeight:   # weight-only quantised (see quantized_linear.py)
        if weight.amx is not None and x.shape[0] > AMX_ABOVE_TOKENS:
            out = cpu_kernels.amx_linear(x, weight.amx, weight.out_features)
            return out if bias is None else out + bias
        if weight.dense is None or x.shape[0] <= KERNEL_MAX_TOKENS:
            return weight.linear(x, bias)
        weight = weight.dense
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if (weight.dtype == torch.bfloat16 and x.shape[0] >= UPCAST_BF16_FROM_TOKENS
            and weight.device.type == "cpu" and bf16_gemm_is_emulated()):
        return _upcast_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # A slice of rows at a time: a whole float32 copy of a large matrix is freshly mapped and
    # faulted in by every call (lm_head at 64 tokens: 90 ms whole, 33 ms in 4 MB slices).
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    rows = max(1, UPCAST_SLICE_BYTES // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        out[:, part] = F.linear(x32, weight[part].float(),
                                None if bias is None else bias[part].float())
    return out
