"""Weight-only quantised matrices for CPU: GGUF Q4_0/Q4_1 as int4 groups, Q8_0 as int8 groups.

QuantizedParts is a matrix's plain, serialisable form (codes and per-group scales, what the
loader reads from GGUF and caches). QuantizedWeight is a float32-looking [out, in] weight
tensor holding one of two formats, chosen by linear.quantized_weight:
- GGUF blocks (`blocks`), the layout of the C++ kernels (kernels/quantized_linear.h): 0.625
  (int4) or 1.0625 (int8) bytes a weight;
- the parts plus, for int4, torch's int4 layout (`packed`), where the C++ kernels do not
  build. torch's int4 kernel takes bfloat16 activations, and what rounding the zero points
  to bfloat16 loses is added back in float32.
For calls of many tokens it may also hold a float32 copy (`dense`) or, for int4 on CPUs with
AMX, AMX operand tiles (`amx`), added by linear.add_large_call_operand.

This file holds the formats and the products each one offers; linear.linear decides which
runs, and the models call it for every matrix. F.embedding on a QuantizedWeight looks up
only the rows it needs (through __torch_function__); any other use of the tensor, F.linear
included, sees the dequantised float matrix (slow, but correct).

GGUF blocks (ggml-common.h): 32 values per block, Q4_0 = fp16 d + 16 bytes of nibbles,
x = d * (q - 8); Q4_1 = fp16 d, fp16 m + nibbles, x = d * q + m; Q8_0 = fp16 d + 32 int8, x = d * q.
Nibble j of a block is the low half of byte j (values 0-15) or the high half of byte j - 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aphrodite.executor.kernels.cpu import ops as cpu_kernels

# GGMLQuantizationType values as plain ints (they compare equal to gguf's IntEnum), so that
# loading a safetensors model never needs the gguf package.
Q4_0, Q4_1, Q8_0 = 2, 3, 8
GROUP_SIZE = 32
INT4_TYPES = (Q4_0, Q4_1)
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}


@dataclass
class QuantizedParts:
    """Plain, serialisable form of a quantised [rows, cols] matrix.

    int4: codes uint8 [rows, cols] in 0..15, x = codes * scales + mins per group of 32 columns
          (scales, mins float32 [rows, cols / 32]).
    int8: codes int8 [rows, cols], x = codes * scales per group of 32 columns; mins None.
    From GGUF, scales and mins are float16 values held in float32.
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
        rows, cols = self.codes.shape
        grouped = self.codes.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE).astype(np.float32)
        if self.kind == "int8":
            return (grouped * self.scales[..., None]).reshape(rows, cols)
        return (grouped * self.scales[..., None] + self.mins[..., None]).reshape(rows, cols)

    def gguf_blocks(self) -> np.ndarray:
        """uint8 [rows, cols / 32 * block bytes]: Q4_1 blocks (int4) or Q8_0 blocks (int8), the
        C++ kernel's layout. Raises ValueError if a scale or min is not a float16 value."""
        rows, cols = self.codes.shape
        groups = self.codes.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
        halves = [self.scales] if self.kind == "int8" else [self.scales, self.mins]
        header = np.stack(halves, axis=-1).astype(np.float16)
        if not np.array_equal(header.astype(np.float32), np.stack(halves, axis=-1)):
            raise ValueError("GGUF blocks need float16 scales and mins")
        if self.kind == "int8":
            body = groups.view(np.uint8)
        else:
            body = groups[..., :16] | (groups[..., 16:] << 4)
        return np.concatenate([header.view(np.uint8), body], axis=-1).reshape(rows, -1)


def parts_from_gguf(raw: np.ndarray, tensor_type: int,
                    shape: tuple[int, int]) -> QuantizedParts:
    """Split a GGUF tensor's raw bytes [rows, bytes per row] into codes and scales."""
    rows, cols = shape
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP_SIZE, _BLOCK_BYTES[tensor_type])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if tensor_type == Q8_0:
        codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return QuantizedParts("int8", codes, d, None)
    if tensor_type == Q4_1:
        mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., 4:]
    else:
        mins = -8 * d
        nibbles = blocks[..., 2:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols)
    return QuantizedParts("int4", codes, d, mins)


class QuantizedWeight(torch.Tensor):
    """A float32-looking [out, in] weight holding quantised codes (see module docstring)."""

    @staticmethod
    def __new__(cls, parts: QuantizedParts, gguf_blocks: bool):
        return torch.Tensor._make_wrapper_subclass(cls, parts.shape, dtype=torch.float32,
                                                   device="cpu", requires_grad=False)

    def __init__(self, parts: QuantizedParts, gguf_blocks: bool):
        """gguf_blocks: hold GGUF blocks for the C++ kernels (which must have built), else the
        parts and torch's int4 layout."""
        if parts.shape[1] % GROUP_SIZE:
            raise ValueError(f"columns must be a multiple of {GROUP_SIZE}: {parts.shape}")
        self.kind = parts.kind
        # Plain ints: reading .shape on a tensor subclass goes through __torch_function__,
        # tens of microseconds that a decode step would pay 120 times.
        self.out_features, self.in_features = parts.shape
        self.blocks = self.parts = None
        self.dense: torch.Tensor | None = None     # a float32 copy, for calls of many tokens
        self.amx: torch.Tensor | None = None       # or AMX operand tiles (cpu_kernels.amx_pack)
        if gguf_blocks:
            self.blocks = torch.from_numpy(parts.gguf_blocks())
            return
        self.parts = parts
        if parts.kind == "int4":
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

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.kind}, shape={(self.out_features, self.in_features)})"

    # Products of x [tokens, in] (float32) with this matrix, [tokens, out] float32; linear.py
    # picks one per call.

    def blocks_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The C++ kernel on the GGUF blocks: float32 activations, so the product is the
        dequantised matrix's up to float32 rounding order."""
        return cpu_kernels.quantized_linear(x, self.blocks, self.kind == "int4")

    def torch_int4_linear(self, x: torch.Tensor) -> torch.Tensor:
        """torch's int4 kernel. In torch 2.13 it is vectorised only for bfloat16 activations
        (float32 takes a scalar path 10-40x slower), so activations are rounded to bfloat16,
        which flips greedy tokens now and then."""
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed,
                                                         GROUP_SIZE, self.scales_and_zeros)
        group_sums = x.reshape(x.shape[0], -1, GROUP_SIZE).sum(-1)
        return torch.addmm(out.float(), group_sums, self.zero_residuals)

    def amx_linear(self, x: torch.Tensor) -> torch.Tensor:
        """kernels/amx_linear.h on the AMX tiles: as accurate as float32."""
        return cpu_kernels.amx_linear(x, self.amx, self.out_features)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantise only the looked-up rows."""
        flat = ids.reshape(-1).cpu()
        if self.blocks is not None:
            rows = cpu_kernels.dequantize_blocks(self.blocks.index_select(0, flat),
                                                 self.kind == "int4", self.in_features)
        else:
            rows = torch.from_numpy(self.parts.take_rows(flat.numpy()).dequantize())
        return rows.reshape(*ids.shape, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix, equal bit for bit to gguf's dequantisation of the blocks."""
        if self.blocks is not None:
            return cpu_kernels.dequantize_blocks(self.blocks, self.kind == "int4",
                                                 self.in_features)
        rows, cols = self.out_features, self.in_features
        grouped = torch.from_numpy(self.parts.codes).view(rows, cols // GROUP_SIZE, GROUP_SIZE)
        scales = torch.from_numpy(self.parts.scales)[..., None]
        if self.kind == "int8":
            return (grouped.float() * scales).view(rows, cols)
        mins = torch.from_numpy(self.parts.mins)[..., None]
        return torch.addcmul(mins, grouped.float(), scales).view(rows, cols)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # F.embedding passes its defaults as keywords; the others only matter for gradients.
        if func is F.embedding and isinstance(args[1], QuantizedWeight) and len(args) == 2 \
                and kwargs.get("padding_idx") is None and kwargs.get("max_norm") is None:
            return args[1].embedding(args[0])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)   # metadata (shape, dtype) or __torch_dispatch__

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Anything else computes on the dequantised matrix.
        def dense(a):
            return a.dequantize() if isinstance(a, QuantizedWeight) else a
        return func(*[dense(a) for a in args], **{k: dense(v) for k, v in (kwargs or {}).items()})
