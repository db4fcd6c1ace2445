"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM) over a flat batch of tokens.

No padding: the batch is the concatenation of every sequence's new tokens, and attention finds
each token's context through the paged KV cache (layers/attention). Q/K/V and gate/up
projections are stacked into one matrix each (column parallel under tensor parallelism),
o_proj and down_proj are row parallel (layers/parallel_linear.py). On CPU a decode step of a
fully quantised model runs all layers in one C++ call (models/fused_decode.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.executor.layers import attention, linear
from aphrodite.executor.layers.activation import silu_and_mul
from aphrodite.executor.layers.attention import AttentionMetadata
from aphrodite.executor.layers.norm import RMSNorm
from aphrodite.executor.layers.parallel_linear import (AllReduce, ColumnParallelLinear,
                                                       RowParallelLinear, torch_all_reduce)
from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.executor.layers.rotary import RotaryEmbedding, rotate_and_cache
from aphrodite.executor.layers.weights import copy_into, empty_param, load_matrix
from aphrodite.executor.models.checkpoint import load_checkpoint
from aphrodite.executor.models.fused_decode import FusedDecode
from aphrodite.model_files import head_dim as config_head_dim
from aphrodite.model_files import max_model_len, rope_settings


class Attention(nn.Module):
    def __init__(self, config, dtype: torch.dtype, tp_rank: int, tp_size: int,
                 all_reduce: AllReduce):
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % tp_size or kv_heads % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} must divide the number of attention "
                             f"heads ({heads}) and of key/value heads ({kv_heads})")
        self.head_dim = config_head_dim(config)
        self.heads, self.kv_heads = heads // tp_size, kv_heads // tp_size   # on this rank
        self.scale = self.head_dim ** -0.5
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # Qwen2 always has q/k/v biases; Llama has them (and an o_proj bias) when attention_bias.
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = getattr(config, "attention_bias", False) and config.model_type != "qwen2"
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, {"q": q_rows, "k": kv_rows,
                                                                  "v": kv_rows},
                                             qkv_bias, dtype, tp_rank, tp_size)
        self.o_proj = RowParallelLinear(q_rows, config.hidden_size, o_bias, dtype, tp_rank,
                                        tp_size, all_reduce)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(tokens, -1, self.head_dim)
        q, k, v = rotate_and_cache(qkv, self.heads, self.kv_heads, cos_sin, kv_cache, meta)
        # A module attribute, so that benchmarks/step_profile.py can time it.
        out = attention.paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype, tp_rank: int, tp_size: int,
                 all_reduce: AllReduce):
        super().__init__()
        if config.hidden_act != "silu":
            raise NotImplementedError(f"activation {config.hidden_act!r} is not supported (only silu)")
        if config.intermediate_size % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} must divide the intermediate size "
                             f"({config.intermediate_size})")
        inter = config.intermediate_size // tp_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {"gate": inter, "up": inter},
                                                 bias, dtype, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias, dtype, tp_rank,
                                           tp_size, all_reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, dtype, tp_rank, tp_size, all_reduce):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, tp_rank, tp_size, all_reduce)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, tp_rank, tp_size, all_reduce)

    def forward(self, cos_sin, x, delta, kv_cache, meta):
        """x: the residual stream, still without the previous layer's MLP output delta (None
        for the first layer). x is updated in place; returns it with this layer's MLP output,
        which the next layer (or the final norm) adds."""
        attn_out = self.self_attn(cos_sin, self.input_layernorm(x, delta), kv_cache, meta)
        return x, self.mlp(self.post_attention_layernorm(x, attn_out))


# A layer's HF module -> ours, and which part of a stacked projection it is.
_LAYER_MODULES = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "self_attn.o_proj": ("self_attn.o_proj", None),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
    "mlp.down_proj": ("mlp.down_proj", None),
}
_NORMS = ("input_layernorm", "post_attention_layernorm")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)$")


class LlamaForCausalLM(nn.Module):
    supports_cuda_graphs = True     # decode steps have host-independent shapes

    def __init__(self, config, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
                 all_reduce: AllReduce | None = None, max_positions: int | None = None):
        """Parameters are created uninitialised on the current default device (use
        `with torch.device(...)` to build on a GPU directly); call load_weights next.
        all_reduce: replaces torch.distributed.all_reduce for tensor parallelism.
        max_positions: size of the rotary tables (default: max_model_len(config))."""
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.tp_rank, self.tp_size = tp_rank, tp_size
        all_reduce = all_reduce or torch_all_reduce
        self.head_dim = config_head_dim(config)
        self.rotary = RotaryEmbedding(self.head_dim, max_positions or max_model_len(config),
                                      rope_settings(config), dtype)
        self.embed_tokens = empty_param(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, tp_rank, tp_size, all_reduce)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (None if self.tie_word_embeddings
                        else empty_param(config.vocab_size, config.hidden_size, dtype=dtype))
        self.fused_decode = FusedDecode()

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads on this rank (what the KV cache is allocated with)."""
        return self.layers[0].self_attn.kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens)
        cos_sin = self.rotary.lookup(positions)
        fused = self.fused_decode.run(self.layers, x, cos_sin, kv_caches, meta)
        if fused is not None:
            return self.norm(fused)
        delta = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, delta = layer(cos_sin, x, delta, kv_cache, meta)
        return self.norm(x, delta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        return linear.linear(hidden, weight).float()

    # -----------------------------------------------------------------------------------------
    # Loading HF-named weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedParts]]) -> None:
        """Fill the parameters from HF-named tensors (or QuantizedParts: matrices kept
        quantised); checks nothing is missing."""
        load_checkpoint(self, weights, self._load_one)

    def _load_one(self, name: str, value: torch.Tensor | QuantizedParts) -> str | None:
        """Load one HF-named tensor; returns the slot it filled (see expected_slots)."""
        if name == "model.embed_tokens.weight":
            return load_matrix(self, "embed_tokens", value)
        if name == "lm_head.weight":
            if self.lm_head is None:
                return None  # tied: the embedding matrix is the output matrix
            return load_matrix(self, "lm_head", value)
        if name == "model.norm.weight":
            return copy_into("norm.weight", self.norm.weight, value)
        if name.endswith("rotary_emb.rope_freqs"):
            self.rotary.set_frequency_divisors(value)
            return None
        if name.endswith("rotary_emb.inv_freq"):
            return None  # old checkpoints store it; we compute our own
        match = _LAYER.match(name)
        if match is None:
            raise ValueError("not a weight of this model")
        index, module, kind = match.groups()
        prefix = f"layers.{index}"
        if module in _NORMS and kind == "weight":
            norm = self.get_submodule(f"{prefix}.{module}")
            return copy_into(f"{prefix}.{module}.weight", norm.weight, value)
        if module not in _LAYER_MODULES:
            raise ValueError("not a weight of this model")
        ours, part = _LAYER_MODULES[module]
        return f"{prefix}.{ours}.{self.get_submodule(f'{prefix}.{ours}').load(kind, value, part)}"
