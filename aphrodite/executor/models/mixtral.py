"""Mixtral: the Llama decoder with a routed-experts block (layers/moe.py) in place of the MLP.

MoeForCausalLM is the base of every mixture-of-experts model here (qwen_moe.py too): Llama's
embedding, rotary, attention, norms, logits and loading, with layers that a subclass builds
(build_mlp) and checkpoint names for the experts (_EXPERT). Its layers are not the standard
decoder layer, so it never runs the fused C++ decode step: its fused_decode always declines.

Checkpoints name experts per expert (block_sparse_moe.experts.N.w1 / w2 / w3, or
mlp.experts.N.gate_proj / up_proj / down_proj); transformers 5 models in memory hold them fused
(mlp.experts.gate_up_proj [E, 2 * inter, hidden], mlp.experts.down_proj [E, hidden, inter]),
and those are split per expert on loading. GGUF files stack them per matrix
(ffn_gate_exps / ffn_up_exps / ffn_down_exps, the router ffn_gate_inp); the loader
(loader/gguf.py) yields those per expert under the mlp.experts.N names, dequantised to float32.
llama.cpp writes Mixtral as arch `llama`, Q/K rows permuted as Llama's; gguf_config.py makes
its config a MixtralConfig.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from aphrodite.executor.layers.norm import RMSNorm
from aphrodite.executor.layers.moe import SparseMoe
from aphrodite.executor.layers.parallel_linear import AllReduce, torch_all_reduce
from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.executor.models.fused_decode import NoFusedDecode
from aphrodite.executor.models.llama import Attention, DecoderLayer, LlamaForCausalLM

# <layer prefix>.<moe block>.experts.<e>.<matrix>.weight -> which part of the expert it is
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": "gate", "w3": "up", "w2": "down",
                "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.(?:block_sparse_moe|mlp)\.experts)\."
                    r"(gate_up_proj|down_proj)$")


class MoeDecoderLayer(DecoderLayer):
    """Llama's pre-norm layer (its forward) around any attention and MLP module."""

    def __init__(self, config, attention: nn.Module, mlp: nn.Module, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = mlp


class MoeForCausalLM(LlamaForCausalLM):
    # Each expert's token count is read back to the host: a step cannot be captured.
    supports_cuda_graphs = False

    def __init__(self, config, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
                 all_reduce: AllReduce | None = None, max_positions: int | None = None):
        # Llama's constructor builds everything but the layers when given none; ours follow.
        no_layers = copy.copy(config)
        no_layers.num_hidden_layers = 0
        super().__init__(no_layers, dtype, tp_rank, tp_size, all_reduce, max_positions)
        self.config = config
        all_reduce = all_reduce or torch_all_reduce
        self.layers = nn.ModuleList(
            MoeDecoderLayer(config, self.build_attention(config, dtype, tp_rank, tp_size,
                                                         all_reduce),
                            self.build_mlp(index, config, dtype, tp_rank, tp_size, all_reduce),
                            dtype)
            for index in range(config.num_hidden_layers))
        self.fused_decode = NoFusedDecode()

    def build_attention(self, config, dtype, tp_rank, tp_size, all_reduce) -> nn.Module:
        return Attention(config, dtype, tp_rank, tp_size, all_reduce)

    def build_mlp(self, index: int, config, dtype, tp_rank, tp_size, all_reduce) -> nn.Module:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedParts]]) -> None:
        super().load_weights(_split_fused_experts(weights))

    def _load_one(self, name: str, value: torch.Tensor | QuantizedParts) -> str | None:
        match = _EXPERT.match(name)
        if match:
            index, expert, matrix = match.groups()
            slot = self._moe(index).load_expert(int(expert), _EXPERT_PART[matrix], value)
            return f"layers.{index}.mlp.{slot}"
        match = _ROUTER.match(name)
        if match:
            index = match.group(1)
            slot = self._moe(index).gate.load("weight", value, "router")
            return f"layers.{index}.mlp.gate.{slot}"
        return super()._load_one(name, value)

    def _moe(self, index: str) -> SparseMoe:
        mlp = self.layers[int(index)].mlp
        if not isinstance(mlp, SparseMoe):
            raise ValueError("experts in a layer that the config makes dense")
        return mlp


def require_silu(config) -> None:
    """The experts' activation: layers/moe.py runs SiLU-gated experts only."""
    if config.hidden_act != "silu":
        raise NotImplementedError(f"activation {config.hidden_act!r} is not supported (only silu)")


def _split_fused_experts(weights: Iterable[tuple[str, torch.Tensor | QuantizedParts]]
                         ) -> Iterator[tuple[str, torch.Tensor | QuantizedParts]]:
    """Fused expert tensors as per-expert ones (mlp.experts.N.gate_proj / up_proj / down_proj)."""
    for name, value in weights:
        match = _FUSED.match(name)
        if match is None or isinstance(value, QuantizedParts):
            yield name, value
            continue
        prefix, matrix = match.groups()
        for expert, tensor in enumerate(value):
            if matrix == "down_proj":
                yield f"{prefix}.{expert}.down_proj.weight", tensor
            else:
                gate, up = tensor.chunk(2, dim=0)
                yield f"{prefix}.{expert}.gate_proj.weight", gate
                yield f"{prefix}.{expert}.up_proj.weight", up


class MixtralForCausalLM(MoeForCausalLM):
    def build_mlp(self, index, config, dtype, tp_rank, tp_size, all_reduce) -> nn.Module:
        require_silu(config)
        return SparseMoe(config.hidden_size, config.intermediate_size, config.num_local_experts,
                         config.num_experts_per_tok, True, dtype, tp_rank, tp_size, all_reduce)
