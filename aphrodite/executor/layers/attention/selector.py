"""The one place that chooses which backend serves a step's decode rows and which its prefill
chunks. AttentionMetadata.build calls select_backends once per step; every layer's
paged_attention (dispatch.py) runs the choice without checking again.

The rules, first match wins:

decode rows (one new token):
    cpu            CPU, the C++ kernels built, a cache the decode kernel reads (float32,
                   bfloat16, or float16 where the CPU has F16C; head_dim a multiple of 8)
    torch_padded   CPU, the C++ kernels built, a cache it does not read
    torch_grouped  CPU without the C++ kernels
    triton         CUDA, Triton installed, head_dim a power of two >= 16
    torch_padded   anything else
prefill chunks (several new tokens):
    cpu            CPU, the C++ kernels built, float32 model, a cache the prefill kernel
                   reads (float32, or float16 with F16C; head_dim a multiple of 8), at most
                   cpu_kernels.PREFILL_TILE_ROWS query heads per kv head
    torch          anything else

AttentionConfig.decode / .prefill, when set, replace the rules' choice. Every backend applies
a layer's sliding window and soft cap (Gemma 2/3), so they play no part in the choice.

On CPU the C++ decode kernel's attention takes 54.8 ms of a default-model decode step at
batch 64, context 128+, grouped torch attention 112.6 ms (benchmarks/step_profile.py
--attention kernel grouped).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from aphrodite.executor.layers.attention import cpu, triton
from aphrodite.executor.layers.attention.config import AttentionConfig


class StepBackends(NamedTuple):
    decode: str | None      # a DECODE_BACKENDS name; None: the step has no decode rows
    prefill: str | None     # a PREFILL_BACKENDS name; None: no prefill chunks
    # A decode-only step on the C++ decode kernel, over a cache the C++ kernels also write:
    # one that a model may run as a whole fused C++ decode step (models/fused_decode.py).
    cpu_decode_kernel: bool


def select_backends(config: AttentionConfig, query_lens: np.ndarray) -> StepBackends:
    """The backends for a step whose rows have query_lens new tokens each."""
    is_decode = query_lens == 1
    decode = prefill = None
    if is_decode.any():
        decode = config.decode or _decode_backend(config)
    if (query_lens > 1).any():
        prefill = config.prefill or _prefill_backend(config)
    decode_only = decode is not None and bool(is_decode.all())
    return StepBackends(decode, prefill, decode_only and decode == "cpu"
                        and cpu.cache_supported(config))


def _decode_backend(config: AttentionConfig) -> str:
    if config.device.type == "cpu":
        if not cpu.kernels_built():
            return "torch_grouped"
        return "cpu" if cpu.decode_supported(config) else "torch_padded"
    if config.device.type == "cuda" and triton.decode_supported(config.head_dim):
        return "triton"
    return "torch_padded"


def _prefill_backend(config: AttentionConfig) -> str:
    if config.device.type == "cpu" and cpu.kernels_built() and cpu.prefill_supported(config):
        return "cpu"
    return "torch"
