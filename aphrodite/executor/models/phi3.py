"""Phi-3 (Phi3ForCausalLM): the Llama decoder layer with fused checkpoint projections.

Phi-3's layer computes what Llama's does (pre-norm attention and SiLU-gated MLP; its residual
dropouts do nothing at inference), so the model is llama.py's. What differs is the checkpoint:
`self_attn.qkv_proj` holds q, k and v stacked by rows and `mlp.gate_up_proj` holds gate then
up. Each is split into its parts here and handed to Llama's loader under the unfused names,
which shards each part for tensor parallelism and stacks them again in our projections. The
128k models' LongRoPE scaling lives in layers/rotary.py.

GGUF files (llama.cpp's arch `phi3`) name the same fused tensors `attn_qkv` and `ffn_up`
(gate then up); quantised ones arrive as QuantizedParts and are split by rows alike. Their
LongRoPE factors are tensors there, which gguf_config.py reads into the config. The layer
being Llama's, the fused C++ decode step (models/fused_decode.py) computes a quantised GGUF
Phi-3's decode steps as well.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.executor.models.llama import LlamaForCausalLM
from aphrodite.model_files import head_dim as config_head_dim

_FUSED = re.compile(r"^(model\.layers\.\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)"
                    r"\.(weight|bias)$")

Weight = torch.Tensor | QuantizedParts


def _split_rows(value: Weight, sizes: list[int]) -> list[Weight]:
    if value.shape[0] != sum(sizes):
        raise ValueError(f"fused shape {tuple(value.shape)} does not have {sum(sizes)} rows")
    if isinstance(value, QuantizedParts):   # GGUF blocks hold whole rows: a split cuts none
        starts = np.cumsum([0, *sizes])
        return [value.take_rows(np.arange(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    return list(torch.split(value, sizes, dim=0))


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config, dtype: torch.dtype, *args, **kwargs):
        partial = (getattr(config, "rope_parameters", None) or {}).get(
            "partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        if partial not in (None, 1.0):
            # Phi-4-mini rotates only part of each head; our rotary tables cover whole heads.
            raise NotImplementedError(
                f"partial_rotary_factor {partial} is not supported (only 1.0)")
        super().__init__(config, dtype, *args, **kwargs)
        head_dim = config_head_dim(config)
        q_rows = config.num_attention_heads * head_dim
        kv_rows = config.num_key_value_heads * head_dim
        inter = config.intermediate_size
        # The full (unsharded) checkpoint rows of each fused tensor's parts, in their order.
        self._fused_parts = {
            "self_attn.qkv_proj": [("self_attn.q_proj", q_rows), ("self_attn.k_proj", kv_rows),
                                   ("self_attn.v_proj", kv_rows)],
            "mlp.gate_up_proj": [("mlp.gate_proj", inter), ("mlp.up_proj", inter)],
        }

    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> None:
        super().load_weights(self._unfuse(weights))

    def _unfuse(self, weights: Iterable[tuple[str, Weight]]) -> Iterator[tuple[str, Weight]]:
        """Each fused tensor as its parts under Llama's names; other tensors unchanged."""
        for name, value in weights:
            match = _FUSED.match(name)
            if match is None:
                yield name, value
                continue
            layer, module, kind = match.groups()
            names, sizes = zip(*self._fused_parts[module])
            try:
                parts = _split_rows(value, list(sizes))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc
            for part_name, part in zip(names, parts):
                yield f"{layer}.{part_name}.{kind}", part
