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


class GemmaRMSNorm(nn.Module):
    """Gemma's RMS norm: x * rsqrt(mean(x²) + eps) * (1 + w) in float32, cast back to x's dtype,
    over the last dimension of any shape (the hidden size, or head_dim for QK-norm).

    Checkpoints store the offset w; load_offset keeps 1 + w, computed in float32 as
    transformers does, so the norm itself is add_rms_norm's (C++ for float32 on CPU)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        # Uninitialised: filled by load_offset. float32 whatever the model dtype.
        self.weight = nn.Parameter(torch.empty(size, dtype=torch.float32), requires_grad=False)
        self.eps = eps

    def load_offset(self, offset: torch.Tensor) -> None:
        if offset.shape != self.weight.shape:
            raise ValueError(f"shape {tuple(offset.shape)} != {tuple(self.weight.shape)}")
        self.weight.copy_(1.0 + offset.float())

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """x += delta in place (the residual stream, in x's dtype), then the norm of x."""
        if x.dtype == torch.float32:
            if delta is not None:
                return add_rms_norm(x, delta, self.weight, self.eps)
            rows = x.reshape(-1, x.shape[-1]).contiguous()   # q/k heads: a copy, x unchanged
            return add_rms_norm(rows, None, self.weight, self.eps).view(x.shape)
        if delta is not None:
            x.add_(delta)
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(x.dtype)
