"""RMS norm with the residual add before it fused in: C++ for float32 on CPU
(kernels/layer_ops.h), torch otherwise.

In a pre-norm decoder every norm but the first follows a residual add; doing both in one pass
updates the residual stream x in place and returns the normed copy. One decode row of the
default model: 4 us for the C++ call, 19 us in torch (benchmarks/step_profile.py counts it
under forward.rest).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.executor.kernels.cpu import ops as cpu_kernels


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x += delta in place (when delta is given); returns F.rms_norm(x) * weight."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and cpu_kernels.library_available():
        return cpu_kernels.add_rms_norm(x, delta, weight, eps)
    if delta is not None:
        x.add_(delta)
    return F.rms_norm(x, weight.shape, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        # Uninitialised: filled by the model's load_weights.
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """x += delta in place (the residual stream), then the norm; in float32 it agrees with
        transformers' unfused norm to rounding."""
        return add_rms_norm(x, delta, self.weight, self.eps)


class HeadRMSNorm(RMSNorm):
    """RMS norm over each head's vector of q or k [tokens, heads, head_dim] (Qwen3's QK-norm).
    The weight [head_dim] is shared by every head, so each tensor-parallel rank holds all of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the normed copy of x, in x's shape; x itself is left as it is."""
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        return add_rms_norm(rows, None, self.weight, self.eps).view(x.shape)
