"""Weight-only quantised matrices for CPU: GGUF's blocks, kept as the file stores them.

QuantizedParts is a matrix's plain, serialisable form: GGUF blocks of one type, row by row
(what the loader reads from GGUF and caches). Q4_0 arrives rewritten as Q4_1 (the same values),
so the int4 kernels know one layout. QuantizedWeight is a float32-looking [out, in] weight
tensor holding, as linear.quantized_weight chooses:
- the blocks (`segments`), for the C++ kernels (kernels/cpu/quantized_linear.h), which
  multiply every type in KERNEL_TYPES; a stacked projection whose parts have different types
  (Q4_K_M files keep some v or down matrices in Q6_K or Q8_0) holds one segment of rows per
  run of equal types;
- where the C++ kernels do not build, Q4_1 as torch's int4 layout (`packed`). torch's int4
  kernel takes bfloat16 activations, and what rounding the zero points to bfloat16 loses is
  added back in float32.
For calls of many tokens it may also hold a float32 copy (`dense`) or, for Q4_1 on CPUs with
AMX, AMX operand tiles (`amx`), added by linear.add_large_call_operand.

This file holds the formats and the products each one offers; linear.linear decides which
runs, and the models call it for every matrix. F.embedding on a QuantizedWeight looks up
only the rows it needs (through __torch_function__); any other use of the tensor, F.linear
included, sees the dequantised float matrix (slow, but correct).

GGUF blocks (ggml-common.h), w the weight and q its code:
  Q4_0  32 values: fp16 d, 16 bytes of nibbles; w = d * (q - 8)
  Q4_1  32 values: fp16 d, fp16 m, nibbles; w = d * q + m. Nibble j of a block is the low half
        of byte j (values 0-15) or the high half of byte j - 16.
  Q5_0  32 values: fp16 d, 4 bytes of fifth bits, nibbles; w = d * (q - 16)
  Q8_0  32 values: fp16 d, 32 int8; w = d * q
  Q4_K, Q5_K  256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins per 32 values,
        (Q5_K: 32 bytes of fifth bits), nibbles; w = d * scale * q - dmin * min
  Q6_K  256 values: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales (one per 16
        values), fp16 d; w = d * scale * (q - 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aphrodite.executor.kernels.cpu import ops as cpu_kernels

# GGMLQuantizationType values as plain ints (they compare equal to gguf's IntEnum), so that
# loading a safetensors model never needs the gguf package.
Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 8, 12, 13, 14
# Values and bytes in one block of each type.
BLOCKS = {Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q8_0: (32, 34),
          Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}
INT4_TYPES = (Q4_0, Q4_1)
# What the C++ kernels multiply and dequantise (Q4_0 reaches them as Q4_1).
KERNEL_TYPES = (Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K)
GROUP_SIZE = 32   # torch's int4 layout: one scale and zero per 32 values


@dataclass
class QuantizedParts:
    """A quantised [rows, cols] matrix: GGUF blocks of ggml_type, uint8 [rows, bytes per row]."""
    ggml_type: int
    blocks: np.ndarray
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.cols

    def take_rows(self, order: np.ndarray) -> "QuantizedParts":
        return QuantizedParts(self.ggml_type, self.blocks[order], self.cols)

    @staticmethod
    def from_codes(kind: str, codes: np.ndarray, scales: np.ndarray,
                   mins: np.ndarray | None) -> "QuantizedParts":
        """Q4_1 ("int4": codes 0..15, w = codes * scales + mins) or Q8_0 ("int8": int8 codes,
        w = codes * scales) blocks, scales and mins per 32 columns. ValueError if a scale or
        min is not a float16 value."""
        rows, cols = codes.shape
        groups = codes.reshape(rows, cols // 32, 32)
        halves = [scales] if kind == "int8" else [scales, mins]
        header = np.stack(halves, axis=-1).astype(np.float16)
        if not np.array_equal(header.astype(np.float32), np.stack(halves, axis=-1)):
            raise ValueError("GGUF blocks need float16 scales and mins")
        body = groups.view(np.uint8) if kind == "int8" else groups[..., :16] | (groups[..., 16:] << 4)
        blocks = np.concatenate([header.view(np.uint8), body], axis=-1).reshape(rows, -1)
        return QuantizedParts(Q8_0 if kind == "int8" else Q4_1, blocks, cols)

    def _q4_1_or_q8_0(self) -> np.ndarray:
        if self.ggml_type not in (Q4_1, Q8_0):
            raise ValueError(f"codes and scales exist for Q4_1 and Q8_0, not type {self.ggml_type}")
        per_block = BLOCKS[self.ggml_type][1]
        return self.blocks.reshape(self.blocks.shape[0], -1, per_block)

    @property
    def codes(self) -> np.ndarray:
        """Q4_1: uint8 [rows, cols] 0..15; Q8_0: int8 [rows, cols]."""
        blocks = self._q4_1_or_q8_0()
        if self.ggml_type == Q8_0:
            return blocks[..., 2:].copy().view(np.int8).reshape(self.shape)
        nibbles = blocks[..., 4:]
        return np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(self.shape)

    @property
    def scales(self) -> np.ndarray:
        """float32 [rows, cols / 32]: each block's d."""
        return self._q4_1_or_q8_0()[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)

    @property
    def mins(self) -> np.ndarray | None:
        """Q4_1: float32 [rows, cols / 32], each block's m; Q8_0: None."""
        blocks = self._q4_1_or_q8_0()
        if self.ggml_type == Q8_0:
            return None
        return blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], gguf's own dequantisation."""
        from gguf.quants import dequantize   # the gguf package: only GGUF models have parts

        return dequantize(self.blocks, self.ggml_type).reshape(self.shape)


def parts_from_gguf(raw: np.ndarray, tensor_type: int,
                    shape: tuple[int, int]) -> QuantizedParts:
    """A GGUF matrix's raw bytes [rows, bytes per row] as QuantizedParts (Q4_0 as Q4_1)."""
    rows, cols = shape
    blocks = np.ascontiguousarray(raw).reshape(rows, -1)
    if tensor_type != Q4_0:
        return QuantizedParts(int(tensor_type), blocks, cols)
    grouped = blocks.reshape(rows, cols // 32, 18)
    d = grouped[..., 0:2].copy().view(np.float16)
    m = d * np.float16(-8)   # exact in float16 unless it overflows
    if not np.isfinite(m).all():
        raise ValueError("a Q4_0 scale too large to rewrite as Q4_1")
    header = np.concatenate([d, m], axis=-1)
    return QuantizedParts(Q4_1, np.concatenate([header.view(np.uint8), grouped[..., 2:]], axis=-1)
                          .reshape(rows, -1), cols)


def merge_runs(parts: list[QuantizedParts]) -> list[QuantizedParts]:
    """Stacked parts (q, k, v, say) with adjacent parts of one type joined into one matrix."""
    runs: list[QuantizedParts] = []
    for part in parts:
        if runs and runs[-1].ggml_type == part.ggml_type and runs[-1].cols == part.cols:
            last = runs.pop()
            part = QuantizedParts(part.ggml_type, np.concatenate([last.blocks, part.blocks]),
                                  part.cols)
        runs.append(part)
    return runs


class QuantizedWeight(torch.Tensor):
    """A float32-looking [out, in] weight holding quantised blocks (see module docstring)."""

    @staticmethod
    def __new__(cls, parts: QuantizedParts | list[QuantizedParts], gguf_blocks: bool):
        runs = merge_runs(parts if isinstance(parts, list) else [parts])
        shape = (sum(p.shape[0] for p in runs), runs[0].cols)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32,
                                                   device="cpu", requires_grad=False)

    def __init__(self, parts: QuantizedParts | list[QuantizedParts], gguf_blocks: bool):
        """parts: the matrix, or the parts of a stacked one in row order. gguf_blocks: hold
        the blocks for the C++ kernels (which must have built), else torch's int4 layout
        (Q4_1 only)."""
        runs = merge_runs(parts if isinstance(parts, list) else [parts])
        # Plain ints: reading .shape on a tensor subclass goes through __torch_function__,
        # tens of microseconds that a decode step would pay 120 times.
        self.out_features, self.in_features = sum(p.shape[0] for p in runs), runs[0].cols
        # (ggml type, blocks) per run of rows; empty where torch's int4 layout stands in.
        self.segments: list[tuple[int, torch.Tensor]] = []
        self.parts: QuantizedParts | None = None   # with torch's int4 layout (`packed`)
        self.packed: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None     # a float32 copy, for calls of many tokens
        self.amx: torch.Tensor | None = None       # or AMX operand tiles (cpu_kernels.amx_pack)
        if gguf_blocks:
            for part in runs:
                if part.ggml_type not in KERNEL_TYPES:
                    raise ValueError(f"no kernel multiplies GGML type {part.ggml_type}")
                if part.cols % BLOCKS[part.ggml_type][0]:
                    raise ValueError(f"{part.cols} columns are not whole blocks of GGML type "
                                     f"{part.ggml_type}")
            self.segments = [(p.ggml_type, torch.from_numpy(np.require(p.blocks, requirements=["C", "W"])))
                             for p in runs]
            return
        if len(runs) != 1 or runs[0].ggml_type != Q4_1:
            raise ValueError("without the C++ kernels only Q4_0/Q4_1 matrices stay quantised")
        self.parts = parts = runs[0]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(parts.codes.astype(np.int32)), 1)
        # torch's int4 convention: x = (q - 8) * scale + zero, laid out [groups, out, 2], in
        # bfloat16 like the activations. What rounding the zeros to bfloat16 loses is added
        # back in float32 as (per-group sums of x) @ residuals: a [tokens, groups] by
        # [groups, out] product, cheap next to the main one.
        scales = torch.from_numpy(parts.scales)
        zeros = torch.from_numpy(parts.mins) + 8 * scales
        self.scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1) \
            .contiguous().to(torch.bfloat16)
        self.zero_residuals = (zeros - self.scales_and_zeros[..., 1].t().float()).t().contiguous()

    @property
    def blocks(self) -> torch.Tensor | None:
        """The blocks of a matrix of one type (one segment), else None."""
        return self.segments[0][1] if len(self.segments) == 1 else None

    @property
    def ggml_type(self) -> int | None:
        """The type of a matrix of one type, else None."""
        return self.segments[0][0] if len(self.segments) == 1 else None

    def __repr__(self) -> str:
        types = [t for t, _ in self.segments] or ["torch int4"]
        return f"QuantizedWeight({types}, shape={(self.out_features, self.in_features)})"

    # Products of x [tokens, in] (float32) with this matrix, [tokens, out] float32; linear.py
    # picks one per call.

    def blocks_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The C++ kernels on the blocks: float32 activations, so the product is the
        dequantised matrix's up to float32 rounding order. Each segment writes its columns."""
        if len(self.segments) == 1:
            return cpu_kernels.quantized_linear(x, self.blocks, self.ggml_type)
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        first = 0
        for ggml_type, blocks in self.segments:
            rows = blocks.shape[0]
            cpu_kernels.quantized_linear(x, blocks, ggml_type, out[:, first:first + rows])
            first += rows
        return out

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
                                                 self.ggml_type, self.in_features)
        else:
            rows = torch.from_numpy(self.parts.take_rows(flat.numpy()).dequantize())
        return rows.reshape(*ids.shape, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix, equal bit for bit to gguf's dequantisation of the blocks."""
        if self.segments:
            return torch.cat([cpu_kernels.dequantize_blocks(blocks, ggml_type, self.in_features)
                              for ggml_type, blocks in self.segments])
        return torch.from_numpy(self.parts.dequantize())
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
