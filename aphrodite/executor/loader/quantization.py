"""Which GGUF matrices stay quantised, and in which mode: "none", "int4" or "int4+dense".

- "none": every matrix dequantised to float32 at load.
- "int4": Q4 matrices (and Q8_0 ones, where the C++ kernels build) kept as QuantizedWeight.
- "int4+dense": kept quantised for calls of a few tokens, plus what calls of many tokens
  multiply (a float32 copy, or AMX tiles: linear.add_large_call_operand).

Quantised execution needs a GGUF model on CPU in float32 without tensor parallelism. "auto"
holds both when the C++ kernels are there: the float32 copy costs 4 bytes a weight on top of
GGUF's ~0.6, and buys float32 GEMM speed for prefill and large decode batches, where the
weight-only kernels lose. If that copy would fill more than DENSE_COPY_MAX_SHARE of the
available memory, auto keeps the blocks only. Without the C++ kernels auto means none: torch's
int4 kernel rounds activations to bfloat16 (layers/quantized.py). So does a file the
converted-weights cache does not take in one piece: k-quant files (Q4_K, Q6_K, ...) are mostly
tensors this path does not keep quantised anyway.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from aphrodite.executor.layers import linear
from aphrodite.executor.layers.quantized import INT4_TYPES, Q8_0, QuantizedWeight
from aphrodite.executor.loader import converted_cache
from aphrodite.executor.loader.gguf import GGUFTensors
from aphrodite.model_files import ModelFiles

logger = logging.getLogger(__name__)

# auto keeps the float32 copy only while it takes at most this share of the available memory.
DENSE_COPY_MAX_SHARE = 0.5


def available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def quantized_types() -> tuple[int, ...]:
    """GGUF types kept quantised: Q4 always; Q8_0 only where matrices hold GGUF blocks, since
    torch's int8 kernel takes one scale per row, not per block."""
    return (*INT4_TYPES, Q8_0) if linear.uses_gguf_blocks() else INT4_TYPES


def quantization_mode(config, files: ModelFiles, device, model) -> str:
    """How a model's GGUF matrices are held (see the module docstring)."""
    if config.quantization == "none" or not files.is_gguf:
        return "none"
    supported = (torch.device(device).type == "cpu"
                 and getattr(model, "dtype", None) == torch.float32
                 and getattr(model, "tp_size", 1) == 1 and hasattr(model, "layers"))
    if not supported:
        if config.quantization == "int4":
            logger.warning("--quantization int4 needs a GGUF model on CPU in float32 without "
                           "tensor parallelism; loading dequantised weights instead")
        return "none"
    if config.quantization == "int4":
        return "int4"
    if (not linear.uses_gguf_blocks()
            or not converted_cache.converts_in_one_piece(files.gguf_path)):
        return "none"   # larger files stream their float32 tensors (see load_model_weights)
    dense_bytes = 4 * sum(int(np.prod(t.shape)) for t in GGUFTensors(files.gguf_path).tensors)
    if dense_bytes > DENSE_COPY_MAX_SHARE * available_ram():
        logger.info("Keeping the GGUF weights quantised only: a float32 copy would take "
                    "%.1f GiB of %.1f GiB available", dense_bytes / 2**30, available_ram() / 2**30)
        return "int4"
    return "int4+dense"


def add_large_call_operands(model: nn.Module) -> None:
    """"int4+dense": every QuantizedWeight the model holds gets what its calls of many tokens
    multiply."""
    for module in model.modules():
        for weight in list(vars(module).values()):
            if isinstance(weight, QuantizedWeight):
                linear.add_large_call_operand(weight)
