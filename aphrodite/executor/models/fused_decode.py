"""A whole decode step's layers in one C++ call (kernels/decode_layers.h), for models whose
matrices all hold GGUF blocks; linear.runs_fused_decode says when a step takes it.

The call runs the standard pre-norm decoder layer: x += o_proj(attention(rotary(qkv_proj(
input_layernorm(x))))), then x += down_proj(act(gate) * up) with gate, up = gate_up_proj(
post_attention_layernorm(x)); RMS norms, "rotate half" rotary, the projections' biases
optional. A model built from those pieces under these names (layers[i].input_layernorm,
.self_attn.qkv_proj / .o_proj, .post_attention_layernorm, .mlp.gate_up_proj / .down_proj; the
attention's heads, kv_heads, head_dim and scale on this rank) can hold a FusedDecode and offer
it each forward pass first.

Optional pieces, read from the modules when present:
- self_attn.q_norm / k_norm: an RMS norm of each q and k head before rotary (Qwen3, Gemma 3).
- Gemma's sandwich norms: a layer with pre_feedforward_layernorm norms the MLP's input with
  it, the attention output with post_attention_layernorm and the MLP output with
  post_feedforward_layernorm, each before its residual add. Every norm is a plain RMS norm
  times its weight (Gemma's hold 1 + w, layers/norm.py).
- self_attn.window (sliding window, None: none) and self_attn.softcap (the model's attention
  soft cap); layer_type "sliding_attention" rotates by the local tables run() is given.
- The activation: SiLU, or tanh-GELU for a FusedDecode(gelu=True).
A stacked projection may hold up to three runs of rows of different GGUF types
(QuantizedWeight.segments), as Gemma 3 270M's q/k/v (Q5_0 and Q8_0) do.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers import linear
from aphrodite.executor.layers.attention import AttentionMetadata
from aphrodite.executor.layers.quantized import QuantizedWeight

MAX_SEGMENTS = 3      # QuantizedMatrix's parts
LOCAL = "sliding_attention"


class FusedDecode:
    def __init__(self, gelu: bool = False):
        self.enabled = True    # False: every step runs layer by layer (tests compare the two)
        self.gelu = gelu       # the MLP's activation: tanh-GELU, else SiLU
        self._weights: ctypes.Array | None = None
        self._built = False

    def run(self, layers: nn.ModuleList, x: torch.Tensor,
            cos_sin: tuple[torch.Tensor, torch.Tensor], kv_caches: list[torch.Tensor],
            meta: AttentionMetadata,
            local_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> torch.Tensor | None:
        """The residual stream after every layer of a decode step (before the final norm),
        updated in place in x, the embedded tokens; None when the step runs layer by layer.
        local_cos_sin: the tables of the "sliding_attention" layers, where they have their
        own (cos_sin: every other layer's)."""
        if not (self.enabled and meta.cpu_decode_kernel and x.dtype == torch.float32):
            return None
        if not self._built:
            self._weights, self._built = layer_weights(layers), True
        attn = layers[0].self_attn
        if self._weights is None or not linear.runs_fused_decode(attn.o_proj.weight, x.shape[0]):
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
        if local_cos_sin is not None:
            local_cos, local_sin = (t.contiguous() for t in local_cos_sin)
            step.local_cos, step.local_sin = local_cos.data_ptr(), local_sin.data_ptr()
        step.gelu = int(self.gelu)
        step.softcap = getattr(attn, "softcap", None) or 0.0
        cpu_kernels.decode_layers(self._weights, step)
        return hidden


class NoFusedDecode(FusedDecode):
    """For a model whose layer is not the one the C++ step implements (routed experts): it
    always declines, so every step runs layer by layer."""

    def run(self, *args, **kwargs) -> None:
        return None


def _held_as_blocks(weight) -> bool:
    return isinstance(weight, QuantizedWeight) and 1 <= len(weight.segments) <= MAX_SEGMENTS


def _plain(norm: nn.Module | None, eps: float) -> bool:
    """A norm the C++ step computes: float32 weights, the step's eps."""
    return norm is None or (norm.weight.dtype == torch.float32 and norm.eps == eps)


def _pointer(norm: nn.Module | None) -> int | None:
    return None if norm is None else norm.weight.data_ptr()


def layer_weights(layers: nn.ModuleList) -> ctypes.Array | None:
    """The layers' norms and matrices as the C++ call's structures; None unless every matrix
    holds GGUF blocks (up to MAX_SEGMENTS types) on a single rank, every norm is float32 with
    one eps and head_dim a multiple of 8."""
    attn = layers[0].self_attn
    projections = [(layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                    layer.mlp.down_proj) for layer in layers]
    norms = [(layer.input_layernorm, layer.post_attention_layernorm,
              getattr(layer, "pre_feedforward_layernorm", None),
              getattr(layer, "post_feedforward_layernorm", None),
              getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None))
             for layer in layers]
    if (attn.o_proj.tp_size != 1 or attn.head_dim % 8
            or not all(_plain(norm, norms[0][0].eps) for group in norms for norm in group)
            or not all(_held_as_blocks(p.weight) for group in projections for p in group)):
        return None

    def matrix(projection) -> cpu_kernels.QuantizedMatrix:
        weight, bias = projection.weight, projection.bias
        parts = [cpu_kernels.MatrixSegment(blocks.data_ptr(), blocks.shape[0], ggml_type)
                 for ggml_type, blocks in weight.segments]
        parts += [cpu_kernels.MatrixSegment()] * (MAX_SEGMENTS - len(parts))
        return cpu_kernels.QuantizedMatrix(
            *parts, None if bias is None else bias.data_ptr(), weight.out_features,
            weight.in_features)

    weights = (cpu_kernels.DecodeLayerWeights * len(layers))()
    for entry, layer, (qkv, o, gate_up, down), group in zip(weights, layers, projections, norms):
        input_norm, post_attention, pre_feedforward, post_feedforward, q_norm, k_norm = group
        entry.input_norm = _pointer(input_norm)
        if pre_feedforward is None:       # Llama: post_attention_layernorm norms the MLP input
            entry.post_norm = _pointer(post_attention)
        else:                             # Gemma's sandwich
            entry.post_norm = _pointer(pre_feedforward)
            entry.attn_out_norm = _pointer(post_attention)
            entry.mlp_out_norm = _pointer(post_feedforward)
        entry.q_norm, entry.k_norm = _pointer(q_norm), _pointer(k_norm)
        entry.qkv, entry.o = matrix(qkv), matrix(o)
        entry.gate_up, entry.down = matrix(gate_up), matrix(down)
        entry.window = getattr(layer.self_attn, "window", None) or 0
        entry.local_rope = int(getattr(layer, "layer_type", None) == LOCAL)
    return weights
