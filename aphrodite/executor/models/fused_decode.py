"""A whole decode step's layers in one C++ call (kernels/decode_layers.h), for models whose
matrices all hold GGUF blocks; linear.runs_fused_decode says when a step takes it.

The call runs the standard pre-norm decoder layer: x += o_proj(attention(rotary(qkv_proj(
input_layernorm(x))))), then x += down_proj(silu(gate) * up) with gate, up = gate_up_proj(
post_attention_layernorm(x)); RMS norms, "rotate half" rotary, the projections' biases
optional. A model built from those pieces under these names (layers[i].input_layernorm,
.self_attn.qkv_proj / .o_proj, .post_attention_layernorm, .mlp.gate_up_proj / .down_proj; the
attention's heads, kv_heads, head_dim and scale on this rank) can hold a FusedDecode and offer
it each forward pass first.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers import linear
from aphrodite.executor.layers.attention import AttentionMetadata
from aphrodite.executor.layers.quantized import QuantizedWeight


class FusedDecode:
    def __init__(self):
        self.enabled = True    # False: every step runs layer by layer (tests compare the two)
        self._weights: ctypes.Array | None = None
        self._built = False

    def run(self, layers: nn.ModuleList, x: torch.Tensor,
            cos_sin: tuple[torch.Tensor, torch.Tensor], kv_caches: list[torch.Tensor],
            meta: AttentionMetadata) -> torch.Tensor | None:
        """The residual stream after every layer of a decode step (before the final norm),
        updated in place in x, the embedded tokens; None when the step runs layer by layer."""
        if not (self.enabled and meta.cpu_decode_kernel):
            return None
        if not self._built:
            self._weights, self._built = layer_weights(layers), True
        attn = layers[0].self_attn
        if self._weights is None or not linear.runs_fused_decode(attn.qkv_proj.weight, x.shape[0]):
            return None
        for weights, kv_cache in zip(self._weights, kv_caches):
            weights.kv_cache = kv_cache.data_ptr()   # every step: callers may swap caches
        kv_cache = kv_caches[0]
        cos, sin = (t.contiguous() for t in cos_sin)
        hidden = x.contiguous()
        step = cpu_kernels.DecodeStep(
            hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(),
            meta.block_tables.data_ptr(), meta.seq_lens.data_ptr(), hidden.shape[0],
            hidden.shape[1], attn.heads, attn.kv_heads, attn.head_dim, kv_cache.shape[2],
            meta.block_tables.shape[1], kv_cache[0].numel(), int(kv_cache.dtype == torch.float16),
            layers[0].input_layernorm.eps, attn.scale)
        cpu_kernels.decode_layers(self._weights, step)
        return hidden



class NoFusedDecode(FusedDecode):
    """For a model whose layer is not the one the C++ step implements (extra norms, routed
    experts): it always declines, so every step runs layer by layer."""

    def run(self, *args, **kwargs) -> None:
        return None


def layer_weights(layers: nn.ModuleList) -> ctypes.Array | None:
    """The layers' norms and matrices as the C++ call's structures; None unless every matrix
    holds GGUF blocks on a single rank in float32, with head_dim a multiple of 8."""
    attn = layers[0].self_attn
    projections = [(layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                    layer.mlp.down_proj) for layer in layers]
    if (attn.o_proj.tp_size != 1 or layers[0].input_layernorm.weight.dtype != torch.float32
            or attn.head_dim % 8
            or not all(isinstance(p.weight, QuantizedWeight) and p.weight.blocks is not None
                       for group in projections for p in group)):
        return None

    def matrix(projection) -> cpu_kernels.QuantizedMatrix:
        weight, bias = projection.weight, projection.bias
        return cpu_kernels.QuantizedMatrix(
            weight.blocks.data_ptr(), None if bias is None else bias.data_ptr(),
            weight.out_features, weight.in_features, weight.ggml_type)

    weights = (cpu_kernels.DecodeLayerWeights * len(layers))()
    for entry, layer, (qkv, o, gate_up, down) in zip(weights, layers, projections):
        entry.input_norm = layer.input_layernorm.weight.data_ptr()
        entry.post_norm = layer.post_attention_layernorm.weight.data_ptr()
        entry.qkv, entry.o = matrix(qkv), matrix(o)
        entry.gate_up, entry.down = matrix(gate_up), matrix(down)
    return weights
