"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM) over a flat batch of tokens.

No padding: the batch is the concatenation of every sequence's new tokens, and attention finds
each token's context through the paged KV cache (see attention.py). Q/K/V and gate/up
projections are fused at load time. Tensor parallel: qkv and gate_up are split by output rows
(column parallel), o_proj and down_proj by input columns (row parallel) followed by an all-reduce.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.attention import AttentionMetadata, paged_attention
from aphrodite.executor.layers.linear import linear, onednn_available, pack_weight
from aphrodite.executor.layers.layer_ops import add_rms_norm, rotate_and_cache, silu_and_mul
from aphrodite.executor.layers.rotary import RotaryEmbedding
from aphrodite.executor.layers.quantized import QuantizedWeight
from aphrodite.model_files import head_dim as config_head_dim
from aphrodite.model_files import max_model_len, rope_settings

AllReduce = Callable[[torch.Tensor], torch.Tensor]

# Decode steps of up to this many sequences run fused on the quantised weights when float32
# copies exist too ("int4+dense" loading); larger ones run layer by layer, each matrix through
# cpu_linear.linear. At 64 sequences: 150 ms a step fused, 172-184 layer by layer in float32.
FUSED_DECODE_MAX_TOKENS = 64


def _empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by load_weights (which checks that).
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _torch_all_reduce(x: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(x)
    return x


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty_param(size, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """x += delta in place (the residual stream), then the norm; in float32 it agrees with
        transformers' unfused norm to rounding."""
        return add_rms_norm(x, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config, dtype: torch.dtype, tp_size: int, all_reduce: AllReduce):
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % tp_size or kv_heads % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} must divide the number of attention "
                             f"heads ({heads}) and of key/value heads ({kv_heads})")
        self.head_dim = config_head_dim(config)
        self.heads, self.kv_heads = heads // tp_size, kv_heads // tp_size   # on this rank
        self.scale = self.head_dim ** -0.5
        self.tp_size = tp_size
        self.all_reduce = all_reduce
        hidden = config.hidden_size
        qkv_rows = (self.heads + 2 * self.kv_heads) * self.head_dim
        # Qwen2 always has q/k/v biases; Llama has them (and an o_proj bias) when attention_bias.
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = getattr(config, "attention_bias", False) and config.model_type != "qwen2"
        self.qkv_weight = _empty_param(qkv_rows, hidden, dtype=dtype)
        self.qkv_bias = _empty_param(qkv_rows, dtype=dtype) if qkv_bias else None
        self.o_weight = _empty_param(hidden, self.heads * self.head_dim, dtype=dtype)
        self.o_bias = _empty_param(hidden, dtype=dtype) if o_bias else None

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = linear(x, self.qkv_weight, self.qkv_bias).view(tokens, -1, self.head_dim)
        q, k, v = rotate_and_cache(qkv, self.heads, self.kv_heads, cos_sin, kv_cache, meta)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        out = linear(out.reshape(tokens, -1), self.o_weight)
        if self.tp_size > 1:
            out = self.all_reduce(out)
        return out if self.o_bias is None else out + self.o_bias


class MLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype, tp_size: int, all_reduce: AllReduce):
        super().__init__()
        if config.hidden_act != "silu":
            raise NotImplementedError(f"activation {config.hidden_act!r} is not supported (only silu)")
        if config.intermediate_size % tp_size:
            raise ValueError(f"tensor parallel size {tp_size} must divide the intermediate size "
                             f"({config.intermediate_size})")
        self.intermediate = config.intermediate_size // tp_size
        self.tp_size = tp_size
        self.all_reduce = all_reduce
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_weight = _empty_param(2 * self.intermediate, config.hidden_size, dtype=dtype)
        self.gate_up_bias = _empty_param(2 * self.intermediate, dtype=dtype) if bias else None
        self.down_weight = _empty_param(config.hidden_size, self.intermediate, dtype=dtype)
        self.down_bias = _empty_param(config.hidden_size, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_weight, self.gate_up_bias)
        out = linear(silu_and_mul(gate_up), self.down_weight)
        if self.tp_size > 1:
            out = self.all_reduce(out)
        return out if self.down_bias is None else out + self.down_bias


class DecoderLayer(nn.Module):
    def __init__(self, config, dtype, tp_size, all_reduce):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, tp_size, all_reduce)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, tp_size, all_reduce)

    def forward(self, cos_sin, x, delta, kv_cache, meta):
        """x: the residual stream, still without the previous layer's MLP output delta (None
        for the first layer). x is updated in place; returns it with this layer's MLP output,
        which the next layer (or the final norm) adds."""
        attn_out = self.self_attn(cos_sin, self.input_layernorm(x, delta), kv_cache, meta)
        return x, self.mlp(self.post_attention_layernorm(x, attn_out))


class LlamaForCausalLM(nn.Module):
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
        all_reduce = all_reduce or _torch_all_reduce
        self.head_dim = config_head_dim(config)
        self.rotary = RotaryEmbedding(self.head_dim, max_positions or max_model_len(config),
                                      rope_settings(config), dtype)
        self.embed_tokens = _empty_param(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, tp_size, all_reduce)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (None if self.tie_word_embeddings
                        else _empty_param(config.vocab_size, config.hidden_size, dtype=dtype))
        self._decode_layers: ctypes.Array | None | bool = None   # False: not eligible

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads on this rank (what the KV cache is allocated with)."""
        return self.layers[0].self_attn.kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens)
        cos_sin = self.rotary.lookup(positions)
        if (meta.num_decode_only and meta.decode_kernel
                and cpu_kernels.cache_supported(kv_caches[0])):
            layers = self._fused_decode_layers(kv_caches, input_ids.shape[0])
            if layers is not None:
                return self.norm(self._decode_fused(layers, x, cos_sin, kv_caches[0], meta))
        delta = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, delta = layer(cos_sin, x, delta, kv_cache, meta)
        return self.norm(x, delta)

    # -----------------------------------------------------------------------------------------
    # CPU decode with quantised weights: every layer in one C++ call (kernels/decode_layers.h)

    def _fused_decode_layers(self, kv_caches: list[torch.Tensor],
                             tokens: int) -> ctypes.Array | None:
        """The layers' weights as C structures, when every matrix has the C++ kernel's
        quantised blocks (single rank, float32) and the step is one it wins; None otherwise."""
        if self._decode_layers is None:
            self._decode_layers = self._build_decode_layers() or False
        layers = self._decode_layers or None
        if layers is None:
            return None
        # With float32 copies of the matrices at hand, larger batches run faster on them.
        if self.layers[0].self_attn.qkv_weight.dense is not None \
                and tokens > FUSED_DECODE_MAX_TOKENS:
            return None
        for weights, kv_cache in zip(layers, kv_caches):
            weights.kv_cache = kv_cache.data_ptr()   # every step: callers may swap caches
        return layers

    def _build_decode_layers(self) -> ctypes.Array | None:
        matrices = [(layer.self_attn.qkv_weight, layer.self_attn.qkv_bias, layer.self_attn.o_weight,
                     layer.self_attn.o_bias, layer.mlp.gate_up_weight, layer.mlp.gate_up_bias,
                     layer.mlp.down_weight, layer.mlp.down_bias) for layer in self.layers]
        if (self.tp_size != 1 or self.dtype != torch.float32 or self.head_dim % 8
                or not all(isinstance(w, QuantizedWeight) and w.blocks is not None
                           for group in matrices for w in group[::2])):
            return None

        def matrix(weight: QuantizedWeight, bias: torch.Tensor | None):
            return cpu_kernels.QuantizedMatrix(
                weight.blocks.data_ptr(), None if bias is None else bias.data_ptr(),
                weight.out_features, weight.in_features, int(weight.kind == "int4"))

        layers = (cpu_kernels.DecodeLayerWeights * len(self.layers))()
        for weights, layer, group in zip(layers, self.layers, matrices):
            weights.input_norm = layer.input_layernorm.weight.data_ptr()
            weights.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            weights.qkv, weights.o = matrix(*group[0:2]), matrix(*group[2:4])
            weights.gate_up, weights.down = matrix(*group[4:6]), matrix(*group[6:8])
        return layers

    def _decode_fused(self, layers: ctypes.Array, x: torch.Tensor,
                      cos_sin: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
        attn = self.layers[0].self_attn
        cos, sin = (t.contiguous() for t in cos_sin)
        hidden = x.contiguous()   # a fresh tensor (the embedding's output), updated in place
        step = cpu_kernels.DecodeStep(
            hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(),
            meta.block_tables.data_ptr(), meta.seq_lens.data_ptr(), hidden.shape[0],
            hidden.shape[1], attn.heads, attn.kv_heads, self.head_dim, kv_cache.shape[2],
            meta.block_tables.shape[1], kv_cache[0].numel(), int(kv_cache.dtype == torch.float16),
            self.layers[0].input_layernorm.eps, attn.scale)
        cpu_kernels.decode_layers(layers, step)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        return linear(hidden, weight).float()

    # -----------------------------------------------------------------------------------------
    # Loading HF-named weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused, sharded parameters; checks nothing is missing."""
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self._load_one(name, tensor)
            if target is not None:
                loaded.add(target)
        if self.lm_head is not None and "lm_head" not in loaded:
            self.lm_head = None  # checkpoint without an output matrix: tied embeddings
        expected = {n for n, _ in self._named_weight_slices()}
        missing = expected - loaded - ({"lm_head"} if self.lm_head is None else set())
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:8]}")
        if (self.embed_tokens.device.type == "cpu" and self.dtype == torch.float32
                and onednn_available()):
            self._pack_matrices_for_cpu()

    def _pack_matrices_for_cpu(self) -> None:
        """Swap each float32 projection for its oneDNN-packed form (see cpu_linear.py).

        Packed tensors are plain attributes, no longer parameters. Tied embeddings get a packed
        copy as lm_head (the lookup needs the plain rows): vocab x hidden more memory, for an
        lm_head 1.7x faster at 64 tokens.
        """
        projections = [(layer.self_attn, name) for layer in self.layers
                       for name in ("qkv_weight", "o_weight")]
        projections += [(layer.mlp, name) for layer in self.layers
                        for name in ("gate_up_weight", "down_weight")]
        if self.lm_head is not None:
            projections.append((self, "lm_head"))
        for module, name in projections:
            weight = getattr(module, name)
            if isinstance(weight, QuantizedWeight):
                continue
            delattr(module, name)
            setattr(module, name, pack_weight(weight.data))
        if self.lm_head is None and not isinstance(self.embed_tokens, QuantizedWeight):
            del self.lm_head       # tied embeddings (maybe a None parameter): a packed copy
            self.lm_head = pack_weight(self.embed_tokens.data)

    def _named_weight_slices(self):
        """Every (name, parameter) that load_weights must fill, in our own naming."""
        for name, param in self.named_parameters():
            if name.endswith(("qkv_weight", "qkv_bias")):
                for part in "qkv":
                    yield f"{name}.{part}", param
            elif name.endswith(("gate_up_weight", "gate_up_bias")):
                for part in ("gate", "up"):
                    yield f"{name}.{part}", param
            else:
                yield name, param

    _LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp|input_layernorm|post_attention_layernorm)"
                        r"\.?(\w*)\.?(weight|bias)$")

    def _load_one(self, name: str, tensor: torch.Tensor) -> str | None:
        if name == "model.embed_tokens.weight":
            return self._copy("embed_tokens", self.embed_tokens, tensor)
        if name == "lm_head.weight":
            if self.lm_head is None:
                return None  # tied: the embedding matrix is the output matrix
            return self._copy("lm_head", self.lm_head, tensor)
        if name == "model.norm.weight":
            return self._copy("norm.weight", self.norm.weight, tensor)
        if name.endswith("rotary_emb.rope_freqs"):
            self.rotary.set_frequency_divisors(tensor)
            return None
        if name.endswith("rotary_emb.inv_freq"):
            return None  # old checkpoints store it; we compute our own
        match = self._LAYER.match(name)
        if match is None:
            raise ValueError(f"unexpected weight {name!r}")
        index, block, proj, kind = match.groups()
        layer = self.layers[int(index)]
        prefix = f"layers.{index}"
        if block in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, block)
            return self._copy(f"{prefix}.{block}.weight", norm.weight, tensor)
        if block == "self_attn":
            return self._load_attention(layer.self_attn, f"{prefix}.self_attn", proj, kind, tensor)
        return self._load_mlp(layer.mlp, f"{prefix}.mlp", proj, kind, tensor)

    def _load_attention(self, attn: Attention, prefix: str, proj: str, kind: str, tensor):
        q_rows, kv_rows = attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim
        if proj == "o_proj":
            if kind == "bias":
                return self._copy(f"{prefix}.o_bias", attn.o_bias, tensor)
            return self._copy(f"{prefix}.o_weight", attn.o_weight, self._shard(tensor, 1, q_rows))
        offsets = {"q_proj": (0, q_rows), "k_proj": (q_rows, kv_rows), "v_proj": (q_rows + kv_rows, kv_rows)}
        if proj not in offsets:
            raise ValueError(f"unexpected attention weight {prefix}.{proj}.{kind}")
        start, rows = offsets[proj]
        param = attn.qkv_weight if kind == "weight" else attn.qkv_bias
        return self._copy(f"{prefix}.qkv_{kind}.{proj[0]}", param, self._shard(tensor, 0, rows), start)

    def _load_mlp(self, mlp: MLP, prefix: str, proj: str, kind: str, tensor):
        size = mlp.intermediate
        if proj == "down_proj":
            if kind == "bias":
                return self._copy(f"{prefix}.down_bias", mlp.down_bias, tensor)
            return self._copy(f"{prefix}.down_weight", mlp.down_weight, self._shard(tensor, 1, size))
        offsets = {"gate_proj": ("gate", 0), "up_proj": ("up", size)}
        if proj not in offsets:
            raise ValueError(f"unexpected MLP weight {prefix}.{proj}.{kind}")
        part, start = offsets[proj]
        param = mlp.gate_up_weight if kind == "weight" else mlp.gate_up_bias
        return self._copy(f"{prefix}.gate_up_{kind}.{part}", param, self._shard(tensor, 0, size), start)

    def _shard(self, tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        """This rank's slice of `size` along `dim` of a full (unsharded) checkpoint tensor."""
        if tensor.shape[dim] != size * self.tp_size:
            raise ValueError(f"shape {tuple(tensor.shape)} does not split into {self.tp_size} x {size}")
        return tensor.narrow(dim, self.tp_rank * size, size)

    @staticmethod
    def _copy(name: str, param: torch.Tensor | None, tensor: torch.Tensor, row_start: int = 0) -> str:
        if param is None:
            raise ValueError(f"checkpoint has {name} but the config says the model has none")
        target = param.data if row_start == 0 and tensor.shape == param.shape else \
            param.data.narrow(0, row_start, tensor.shape[0])
        if target.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(target.shape)}")
        target.copy_(tensor)
        return name
