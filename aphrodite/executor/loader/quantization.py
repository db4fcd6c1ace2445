"""Which GGUF matrices stay quantised, and in which mode: "none", "int4" or "int4+dense".

- "none": every matrix dequantised to float32 at load.
- "int4": matrices kept in their GGUF blocks as QuantizedWeight: every type the C++ kernels
  multiply (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) where they build, else Q4 only.
- "int4+dense": kept quantised for calls of a few tokens, plus what calls of many tokens
  multiply (a float32 copy, or AMX tiles: linear.add_large_call_operand).

Quantised execution needs a GGUF model on CPU in float32 without tensor parallelism. "auto"
holds both when the C++ kernels are there and both fit: the float32 copy costs 4 bytes a
weight on top of GGUF's ~0.6, and buys float32 GEMM speed for prefill and large decode
batches, where the weight-only kernels lose. Where the copy would take the model past
DENSE_COPY_MAX_SHARE of the available memory, auto keeps the blocks only. Without the C++
kernels auto means none: torch's int4 kernel rounds activations to bfloat16
(layers/quantized.py). Tensors of other GGUF types (Q2_K, Q3_K, IQ*, ...) are dequantised to
float32 in every mode, and the log names them. The start-up log says which mode was chosen,
why, and the bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from aphrodite.executor.layers import linear
from aphrodite.executor.layers.quantized import INT4_TYPES, KERNEL_TYPES, Q4_0, QuantizedWeight
from aphrodite.gguf_reader import GGUFTensors
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
    """GGUF types kept quantised: those the C++ kernels multiply where they build, else Q4
    only (torch's int4 kernel)."""
    return (Q4_0, *KERNEL_TYPES) if linear.uses_gguf_blocks() else INT4_TYPES


@dataclass
class Footprint:
    """What a GGUF file's tensors take once loaded, by how they are held."""
    kept_bytes: int = 0        # matrices kept in GGUF's blocks
    kept_weights: int = 0      # their elements: a float32 copy of them takes 4 bytes each
    float_bytes: int = 0       # everything dequantised to float32
    # Quantised types dequantised at load (not F32/F16/BF16, which are plain floats anyway),
    # with their tensor counts.
    dequantised: dict[str, int] = field(default_factory=dict)

    def total(self, mode: str) -> int:
        if mode == "none":
            return self.float_bytes + 4 * self.kept_weights
        copy = 4 * self.kept_weights if mode == "int4+dense" else 0
        return self.float_bytes + self.kept_bytes + copy


_FLOAT_TYPES = ("F32", "F16", "BF16")


def footprint(path: str, kept: tuple[int, ...]) -> Footprint:
    """The bytes a GGUF file's tensors take when matrices (2-D tensors) of the `kept` types
    stay quantised and everything else is dequantised to float32."""
    result = Footprint()
    for tensor in GGUFTensors(path).tensors:
        elements = int(np.prod(tensor.shape))
        if tensor.tensor_type in kept and len(tensor.shape) == 2:
            result.kept_bytes += tensor.data.nbytes
            result.kept_weights += elements
            continue
        result.float_bytes += 4 * elements
        name = tensor.tensor_type.name
        if name not in _FLOAT_TYPES:
            result.dequantised[name] = result.dequantised.get(name, 0) + 1
    return result


def quantization_mode(config, files: ModelFiles, device, model) -> str:
    """How a model's GGUF matrices are held (see the module docstring); logs the choice."""
    if not files.is_gguf:
        return "none"
    usage = footprint(files.gguf_path, quantized_types())   # every mode's total, from one read
    mode, why = _choose(config, usage, device, model)
    gib = 2 ** 30
    logger.info("GGUF weights: --quantization %s -> %s (%s): %.2f GiB once loaded, "
                "%.2f GiB of memory available", config.quantization, mode, why,
                usage.total(mode) / gib, available_ram() / gib)
    # Named in every mode: these stay float32 even where quantised matrices are asked for.
    if usage.dequantised:
        logger.info("Dequantised to float32 at load, no kernel keeps these GGUF types "
                    "quantised: %s",
                    ", ".join(f"{n} ({c} tensors)" for n, c in sorted(usage.dequantised.items())))
    return mode


def _choose(config, usage: Footprint, device, model) -> tuple[str, str]:
    """The mode and the reason for it."""
    if config.quantization == "none":
        return "none", "asked for"
    supported = (torch.device(device).type == "cpu"
                 and getattr(model, "dtype", None) == torch.float32
                 and getattr(model, "tp_size", 1) == 1 and hasattr(model, "layers"))
    if not supported:
        if config.quantization == "int4":
            logger.warning("--quantization int4 needs a GGUF model on CPU in float32 without "
                           "tensor parallelism; loading dequantised weights instead")
        return "none", "quantised matrices run on CPU in float32 without tensor parallelism"
    if config.quantization == "int4":
        return "int4", "asked for"
    if not linear.uses_gguf_blocks():
        return "none", "without the C++ kernels, torch's int4 kernel rounds activations to bfloat16"
    budget = DENSE_COPY_MAX_SHARE * available_ram()
    if usage.total("int4+dense") > budget:
        return "int4", (f"a float32 copy for long calls would take the weights to "
                        f"{usage.total('int4+dense') / 2**30:.2f} GiB, over "
                        f"{DENSE_COPY_MAX_SHARE:.0%} of the memory available")
    return "int4+dense", "GGUF blocks for short calls, a float32 copy (or AMX tiles) for long ones"


def add_large_call_operands(model: nn.Module) -> None:
    """"int4+dense": every QuantizedWeight the model holds gets what its calls of many tokens
    multiply."""
    for module in model.modules():
        for weight in list(vars(module).values()):
            if isinstance(weight, QuantizedWeight):
                linear.add_large_call_operand(weight)
