"""The SiLU-gated product of a gated MLP: C++ for float32 on CPU (kernels/layer_ops.h), torch
otherwise. One decode row of the default model: 5 us for the C++ call, 8 us in torch
(benchmarks/step_profile.py counts it under forward.rest)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aphrodite.executor.kernels.cpu import ops as cpu_kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * inter] (gate, then up) -> F.silu(gate) * up."""
    if (gate_up.dtype == torch.float32 and gate_up.device.type == "cpu"
            and cpu_kernels.library_available()):
        return cpu_kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * inter] (gate, then up) -> gelu(gate, tanh approximation) * up (Gemma's
    gelu_pytorch_tanh MLP)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
