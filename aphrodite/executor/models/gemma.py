"""Gemma 2 and Gemma 3 (text) decoders over a flat batch of tokens, as transformers'
modeling_gemma2.py / modeling_gemma3.py compute them.

What sets them apart from Llama (models/llama.py):
- RMS norms compute x * (1 + w) in float32 (layers/norm.py GemmaRMSNorm); each layer has four:
  input, post-attention (on the attention output, before the residual add), pre-feedforward
  and post-feedforward (on the MLP output, before the residual add).
- Embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype first.
- MLP: down(gelu_tanh(gate) * up).
- Attention scale query_pre_attn_scalar ** -0.5. The layers of type "sliding_attention"
  (config.layer_types) attend through config.sliding_window: a token at position p sees
  positions > p - window. Each layer passes its window (and Gemma 2's soft cap) to
  paged_attention, and every attention backend applies them.
- Gemma 3: QK-norm (the (1 + w) norm over head_dim on each q and k head) and two rotary tables,
  the local layers' base (rope_parameters["sliding_attention"], 10k) and the global layers'
  (rope_parameters["full_attention"], 1M, with its scaling); final_logit_softcapping may be None.
- Gemma 2: attention scores soft-capped (tanh(s / cap) * cap) and the logits too; one rotary
  table for every layer.

On CPU a decode step of a model whose matrices all hold GGUF blocks runs every layer in one
C++ call (models/fused_decode.py, with tanh-GELU, the four norms, QK-norm, each layer's window
and rotary table); prefill, mixed steps and other weights run layer by layer. The embedding
scale, the final norm and the logits' soft cap stay here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.executor.layers import attention, linear
from aphrodite.executor.layers.activation import gelu_tanh_and_mul
from aphrodite.executor.layers.attention import AttentionMetadata
from aphrodite.executor.layers.norm import GemmaRMSNorm
from aphrodite.executor.layers.parallel_linear import (AllReduce, ColumnParallelLinear,
                                                       RowParallelLinear, torch_all_reduce)
from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.executor.layers.rotary import RotaryEmbedding, rotate_and_cache
from aphrodite.executor.layers.weights import empty_param, load_matrix
from aphrodite.executor.models.checkpoint import load_checkpoint
from aphrodite.executor.models.fused_decode import FusedDecode
from aphrodite.model_files import max_model_len, rope_settings

SLIDING, FULL = "sliding_attention", "full_attention"


class GemmaAttention(nn.Module):
    def __init__(self, config, layer_type: str, qk_norm: bool, dtype: torch.dtype, tp_rank: int,
                 tp_size: int, all_reduce: AllReduce):
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % tp_size or kv_heads % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} must divide the number of attention "
                             f"heads ({heads}) and of key/value heads ({kv_heads})")
        self.head_dim = config.head_dim
        self.heads, self.kv_heads = heads // tp_size, kv_heads // tp_size   # on this rank
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.window = config.sliding_window if layer_type == SLIDING else None
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, {"q": q_rows, "k": kv_rows,
                                                                  "v": kv_rows},
                                             bias, dtype, tp_rank, tp_size)
        self.o_proj = RowParallelLinear(q_rows, config.hidden_size, bias, dtype, tp_rank,
                                        tp_size, all_reduce)
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(tokens, -1, self.head_dim)
        if self.q_norm is not None:
            q_end, k_end = self.heads, self.heads + self.kv_heads
            qkv[:, :q_end] = self.q_norm(qkv[:, :q_end])
            qkv[:, q_end:k_end] = self.k_norm(qkv[:, q_end:k_end])
        q, k, v = rotate_and_cache(qkv, self.heads, self.kv_heads, cos_sin, kv_cache, meta)
        out = attention.paged_attention(q, k, v, kv_cache, meta, self.scale, self.window,
                                        self.softcap)
        return self.o_proj(out.reshape(tokens, -1))


class GemmaMLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype, tp_rank: int, tp_size: int,
                 all_reduce: AllReduce):
        super().__init__()
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        if act != "gelu_pytorch_tanh":
            raise NotImplementedError(f"activation {act!r} is not supported "
                                      "(only gelu_pytorch_tanh)")
        if config.intermediate_size % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} must divide the intermediate size "
                             f"({config.intermediate_size})")
        inter = config.intermediate_size // tp_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {"gate": inter, "up": inter},
                                                 False, dtype, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, False, dtype, tp_rank,
                                           tp_size, all_reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh_and_mul(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer_type, qk_norm, dtype, tp_rank, tp_size, all_reduce):
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = layer_type
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = GemmaAttention(config, layer_type, qk_norm, dtype, tp_rank, tp_size,
                                        all_reduce)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = GemmaMLP(config, dtype, tp_rank, tp_size, all_reduce)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, cos_sin, x, delta, kv_cache, meta):
        """x: the residual stream, still without the previous layer's output delta (None for
        the first layer), updated in place; returns it and this layer's normed MLP output."""
        attn_out = self.self_attn(cos_sin, self.input_layernorm(x, delta), kv_cache, meta)
        mlp_in = self.pre_feedforward_layernorm(x, self.post_attention_layernorm(attn_out))
        return x, self.post_feedforward_layernorm(self.mlp(mlp_in))


_LAYER_MODULES = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "self_attn.o_proj": ("self_attn.o_proj", None),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
    "mlp.down_proj": ("mlp.down_proj", None),
}
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)$")


def layer_types(config) -> list[str]:
    """Each layer's attention type: config.layer_types, else Gemma 3's sliding_window_pattern
    (every pattern-th layer global) or Gemma 2's alternation (even layers local)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    pattern = getattr(config, "sliding_window_pattern", None) or (
        6 if config.model_type.startswith("gemma3") else 2)
    return [SLIDING if (i + 1) % pattern else FULL for i in range(config.num_hidden_layers)]


class Gemma3ForCausalLM(nn.Module):
    QK_NORM = True
    # Decode steps may replay CUDA graphs: the torch and Triton decodes find each window from the
    # refilled seq_lens, and nothing is read back to the host.
    supports_cuda_graphs = True

    def __init__(self, config, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
                 all_reduce: AllReduce | None = None, max_positions: int | None = None):
        """As LlamaForCausalLM's: parameters uninitialised, filled by load_weights."""
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError("bidirectional attention is not supported")
        self.config = config
        self.dtype = dtype
        self.tp_rank, self.tp_size = tp_rank, tp_size
        all_reduce = all_reduce or torch_all_reduce
        self.head_dim = config.head_dim
        types = layer_types(config)
        positions = max_positions or max_model_len(config)
        params = getattr(config, "rope_parameters", None) or {}
        # Gemma 3: one rotary table per layer type (rope_parameters keyed by type); Gemma 2: one
        # table for all.
        self.rotary = nn.ModuleDict()
        for kind in sorted(set(types)):
            own = params.get(kind)
            if not isinstance(own, dict) and self.rotary:
                self.rotary[kind] = next(iter(self.rotary.values()))
                continue
            settings = rope_settings(config if own is None else SimpleNamespace(
                rope_parameters=own, max_position_embeddings=config.max_position_embeddings))
            self.rotary[kind] = RotaryEmbedding(self.head_dim, positions, settings, dtype)
        # transformers multiplies by the normalizer rounded to the weights' dtype
        self.embed_scale = float(torch.tensor(config.hidden_size ** 0.5).to(dtype))
        self.embed_tokens = empty_param(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, kind, self.QK_NORM, dtype, tp_rank, tp_size, all_reduce)
            for kind in types)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = (None if self.tie_word_embeddings
                        else empty_param(config.vocab_size, config.hidden_size, dtype=dtype))
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.fused_decode = FusedDecode(gelu=True)

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].self_attn.kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens) * self.embed_scale
        cos_sin, by_table = {}, {}   # a table that both layer types share is looked up once
        for kind, rotary in self.rotary.items():
            if id(rotary) not in by_table:
                by_table[id(rotary)] = rotary.lookup(positions)
            cos_sin[kind] = by_table[id(rotary)]
        fused = self.fused_decode.run(self.layers, x, cos_sin.get(FULL) or cos_sin[SLIDING],
                                      kv_caches, meta, cos_sin.get(SLIDING))
        if fused is not None:
            return self.norm(fused)
        delta = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, delta = layer(cos_sin[layer.layer_type], x, delta, kv_cache, meta)
        return self.norm(x, delta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = linear.linear(hidden, weight)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedParts]]) -> None:
        """Fill the parameters from HF-named tensors; checks nothing is missing."""
        load_checkpoint(self, weights, self._load_one)

    def _load_one(self, name: str, value: torch.Tensor | QuantizedParts) -> str | None:
        if name == "model.embed_tokens.weight":
            return load_matrix(self, "embed_tokens", value)
        if name == "lm_head.weight":
            return None if self.lm_head is None else load_matrix(self, "lm_head", value)
        if name == "model.norm.weight":
            self.norm.load_offset(value)
            return "norm.weight"
        match = _LAYER.match(name)
        if match is None:
            raise ValueError("not a weight of this model")
        index, module, kind = match.groups()
        prefix = f"layers.{index}"
        if module in _NORMS and kind == "weight":
            try:
                norm = self.get_submodule(f"{prefix}.{module}")
            except AttributeError:     # q_norm / k_norm of a model without QK-norm
                raise ValueError("not a weight of this model") from None
            norm.load_offset(value)
            return f"{prefix}.{module}.weight"
        if module not in _LAYER_MODULES:
            raise ValueError("not a weight of this model")
        ours, part = _LAYER_MODULES[module]
        return f"{prefix}.{ours}.{self.get_submodule(f'{prefix}.{ours}').load(kind, value, part)}"


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 2: Gemma 3's layer without QK-norm (its soft caps come from the config)."""
    QK_NORM = False
