"""Model classes by architecture: a new architecture is a module here plus a line in _REGISTRY.

Each entry maps an HF `architectures` name to its model's module (in this package) and class,
and names the GGUF `model_type` it serves (GGUF-derived configs carry only model_type, no
architectures list). A model class takes (config, dtype, tp_rank, tp_size) and offers
forward, compute_logits, load_weights (HF-named tensors or QuantizedParts), num_kv_heads,
head_dim and supports_cuda_graphs (False: decode steps on a GPU run eagerly), as llama.py's
does.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from aphrodite.executor.models.llama import LlamaForCausalLM


class Entry(NamedTuple):
    module: str
    cls: str
    model_type: str


# Mistral and Qwen2 are Llama with different defaults (Qwen2: q/k/v biases), one class serves all.
_REGISTRY = {
    "LlamaForCausalLM": Entry("llama", "LlamaForCausalLM", "llama"),
    "MistralForCausalLM": Entry("llama", "LlamaForCausalLM", "mistral"),
    "Qwen2ForCausalLM": Entry("llama", "LlamaForCausalLM", "qwen2"),
    "MixtralForCausalLM": Entry("mixtral", "MixtralForCausalLM", "mixtral"),
    "Qwen2MoeForCausalLM": Entry("qwen_moe", "Qwen2MoeForCausalLM", "qwen2_moe"),
    "Qwen3MoeForCausalLM": Entry("qwen_moe", "Qwen3MoeForCausalLM", "qwen3_moe"),
    "Qwen3ForCausalLM": Entry("qwen3", "Qwen3ForCausalLM", "qwen3"),
    "Gemma3ForCausalLM": Entry("gemma", "Gemma3ForCausalLM", "gemma3_text"),
    "Gemma2ForCausalLM": Entry("gemma", "Gemma2ForCausalLM", "gemma2"),
    "Phi3ForCausalLM": Entry("phi3", "Phi3ForCausalLM", "phi3"),
}

__all__ = ["LlamaForCausalLM", "get_model_class"]


def get_model_class(config) -> type:
    architectures = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", None)
    entry = next((_REGISTRY[arch] for arch in architectures if arch in _REGISTRY), None)
    if entry is None and not architectures:
        entry = next((e for e in _REGISTRY.values() if e.model_type == model_type), None)
    if entry is None:
        raise ValueError(
            f"unsupported model: architectures={getattr(config, 'architectures', None)}, "
            f"model_type={model_type!r}; supported architectures: {', '.join(_REGISTRY)}")
    module = importlib.import_module(f"{__name__}.{entry.module}")
    return getattr(module, entry.cls)
