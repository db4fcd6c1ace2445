"""Model classes by architecture."""

from __future__ import annotations

from aphrodite.executor.models.llama import LlamaForCausalLM

# Mistral and Qwen2 are Llama with different defaults (Qwen2: q/k/v biases), one class serves all.
_BY_ARCHITECTURE = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
# GGUF-derived configs carry only model_type, no architectures list.
_BY_MODEL_TYPE = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM}


def get_model_class(config) -> type:
    for arch in getattr(config, "architectures", None) or []:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    model_type = getattr(config, "model_type", None)
    if not getattr(config, "architectures", None) and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(
        f"unsupported model: architectures={getattr(config, 'architectures', None)}, "
        f"model_type={model_type!r}; supported architectures: {', '.join(_BY_ARCHITECTURE)}")
