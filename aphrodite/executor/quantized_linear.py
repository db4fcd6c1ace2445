"""Weight-only quantised matrices for CPU: GGUF Q4_0/Q4_1 as int4 groups, Q8_0 as int8 rows.

A QuantizedWeight stands in for a float [out, in] weight tensor: the model keeps calling
F.linear(x, weight, bias) and F.embedding(ids, weight), and __torch_function__ routes those
calls to torch's weight-only kernels, so the model code needs no quantisation-specific layers.
Any other use of the tensor sees the dequantised float matrix (slow, but correct).

Kernels (torch 2.13, AVX2): _weight_int4pack_mm_for_cpu and _weight_int8pack_mm are vectorised
only for bfloat16 activations (float32 and float16 take a scalar path 10-40x slower), so
activations are rounded to bfloat16 for the matmul and the output converted back to float32.

GGUF blocks (ggml-common.h): 32 values per block, Q4_0 = fp16 d + 16 bytes of nibbles,
x = d * (q - 8); Q4_1 = fp16 d, fp16 m + nibbles, x = d * q + m; Q8_0 = fp16 d + 32 int8, x = d * q.
Nibble j of a block is the low half of byte j (values 0-15) or the high half of byte j - 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# GGMLQuantizationType values as plain ints (they compare equal to gguf's IntEnum), so that
# loading a safetensors model never needs the gguf package.
Q4_0, Q4_1, Q8_0 = 2, 3, 8
GROUP_SIZE = 32
# Above this many tokens per call the weight-only kernels lose to float32 GEMM (measured on the
# 2-core AVX2 dev machine: int4 kernel ~1.0-1.5x faster at 1 token, 1.3-2x slower at 16-64), so
# larger calls (prefill chunks, big decode batches) dequantise the matrix and use float32.
DENSE_ABOVE_TOKENS = 16
INT4_TYPES = (Q4_0, Q4_1)
QUANTIZABLE_TYPES = (*INT4_TYPES, Q8_0)
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}


@dataclass
class QuantizedParts:
    """Plain, serialisable form of a quantised [rows, cols] matrix.

    int4: codes uint8 [rows, cols] in 0..15, x = codes * scales + mins per group of 32 columns
          (scales, mins float32 [rows, cols / 32]).
    int8: codes int8 [rows, cols], x = codes * scales per row (scales float32 [rows, 1]); mins None.
    """
    kind: str
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def take_rows(self, order: np.ndarray) -> "QuantizedParts":
        return QuantizedParts(self.kind, self.codes[order], self.scales[order],
                              None if self.mins is None else self.mins[order])

    @staticmethod
    def cat_rows(parts: list["QuantizedParts"]) -> "QuantizedParts":
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot fuse matrices of different kinds {sorted(kinds)}")
        mins = None if parts[0].mins is None else np.concatenate([p.mins for p in parts])
        return QuantizedParts(parts[0].kind, np.concatenate([p.codes for p in parts]),
                              np.concatenate([p.scales for p in parts]), mins)

    def dequantize(self) -> np.ndarray:
        if self.kind == "int8":
            return self.codes.astype(np.float32) * self.scales
        rows, cols = self.codes.shape
        grouped = self.codes.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE).astype(np.float32)
        return (grouped * self.scales[..., None] + self.mins[..., None]).reshape(rows, cols)


def parts_from_gguf(raw: np.ndarray, tensor_type: int,
                    shape: tuple[int, int]) -> QuantizedParts:
    """Split a GGUF tensor's raw bytes [rows, bytes per row] into codes and scales."""
    rows, cols = shape
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP_SIZE, _BLOCK_BYTES[tensor_type])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if tensor_type == Q8_0:
        codes = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
        return requantize_int8_rows(codes * d[..., None], rows, cols)
    if tensor_type == Q4_1:
        mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., 4:]
    else:
        mins = -8 * d
        nibbles = blocks[..., 2:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols)
    return QuantizedParts("int4", codes, d, mins)


def requantize_int8_rows(values: np.ndarray, rows: int, cols: int) -> QuantizedParts:
    """Symmetric int8 with one scale per row: _weight_int8pack_mm has per-channel scales only,
    so Q8_0's per-block scales are folded into a row scale (one rounding more)."""
    values = values.reshape(rows, cols)
    scales = np.abs(values).max(axis=1, keepdims=True) / 127
    scales[scales == 0] = 1
    codes = np.clip(np.rint(values / scales), -127, 127).astype(np.int8)
    return QuantizedParts("int8", codes, scales.astype(np.float32), None)


class QuantizedWeight(torch.Tensor):
    """A float32-looking [out, in] weight holding quantised codes (see module docstring)."""

    @staticmethod
    def __new__(cls, parts: QuantizedParts):
        return torch.Tensor._make_wrapper_subclass(cls, parts.shape, dtype=torch.float32,
                                                   device="cpu", requires_grad=False)

    def __init__(self, parts: QuantizedParts):
        self.kind = parts.kind
        self.parts = parts
        if parts.kind == "int4":
            if parts.shape[1] % GROUP_SIZE:
                raise ValueError(f"int4 columns must be a multiple of {GROUP_SIZE}: {parts.shape}")
            codes = torch.from_numpy(parts.codes.astype(np.int32))
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            # torch's int4 convention: x = (q - 8) * scale + zero, laid out [groups, out, 2],
            # in bfloat16 like the activations. What rounding the zeros to bfloat16 loses is
            # added back in float32 as (per-group sums of x) @ residuals: a [tokens, groups]
            # by [groups, out] product, cheap next to the main one.
            scales = torch.from_numpy(parts.scales)
            zeros = torch.from_numpy(parts.mins) + 8 * scales
            self.scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1) \
                .contiguous().to(torch.bfloat16)
            self.zero_residuals = (zeros - self.scales_and_zeros[..., 1].t().float()).t().contiguous()
        else:
            self.packed = torch.from_numpy(parts.codes)
            self.row_scales = torch.from_numpy(parts.scales[:, 0]).to(torch.bfloat16)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.kind}, shape={tuple(self.shape)})"

    def nbytes_quantized(self) -> int:
        extras = [self.scales_and_zeros, self.zero_residuals] if self.kind == "int4" else [self.row_scales]
        return sum(t.numel() * t.element_size() for t in [self.packed, *extras])

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.numel() > DENSE_ABOVE_TOKENS * x.shape[-1]:
            return F.linear(x, self.dequantize(), bias)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.kind == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP_SIZE,
                                                             self.scales_and_zeros)
            group_sums = x.reshape(flat.shape[0], -1, GROUP_SIZE).sum(-1)
            out = torch.addmm(out.to(x.dtype), group_sums, self.zero_residuals)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.row_scales)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.shape[0])
        return out if bias is None else out + bias

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantise only the looked-up rows."""
        rows = self.parts.take_rows(ids.reshape(-1).cpu().numpy())
        return torch.from_numpy(rows.dequantize()).reshape(*ids.shape, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.shape
        codes = torch.from_numpy(self.parts.codes)
        scales = torch.from_numpy(self.parts.scales)
        if self.kind == "int8":
            return codes.float() * scales
        grouped = codes.view(rows, cols // GROUP_SIZE, GROUP_SIZE).float()
        mins = torch.from_numpy(self.parts.mins)
        return torch.addcmul(mins[..., None], grouped, scales[..., None]).view(rows, cols)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and isinstance(args[1], QuantizedWeight) \
                and not isinstance(args[0], QuantizedWeight):
            return args[1].linear(args[0], *args[2:], **kwargs)
        if func is F.embedding and isinstance(args[1], QuantizedWeight) and len(args) == 2 \
                and not kwargs:
            return args[1].embedding(args[0])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)   # metadata (shape, dtype) or __torch_dispatch__

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Anything else computes on the dequantised matrix.
        def dense(a):
            return a.dequantize() if isinstance(a, QuantizedWeight) else a
        return func(*[dense(a) for a in args], **{k: dense(v) for k, v in (kwargs or {}).items()})
