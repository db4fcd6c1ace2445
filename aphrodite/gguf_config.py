"""The facts of a GGUF file's config that transformers' GGUF parsing misses or gets wrong.

model_files.load_config builds a GGUF model's config with transformers
(AutoConfig.from_pretrained(gguf_file=...)) and passes it through fix_gguf_config, which sets
what llama.cpp's converter wrote but transformers does not read (its mapping:
transformers/integrations/ggml.py):

- head_dim from `<arch>.attention.key_length` (transformers reads it for Gemma and Qwen3-MoE
  only, so a Qwen3 file gets Qwen3Config's default, 128);
- Mixtral: llama.cpp writes it as arch `llama` with `llama.expert_count`, which transformers
  turns into a dense LlamaConfig; it becomes a MixtralConfig with its expert counts;
- the experts' sizes of Qwen2-MoE and Qwen3-MoE (`expert_feed_forward_length`,
  `expert_shared_feed_forward_length`; transformers keeps the config classes' defaults) and
  `expert_weights_norm` where a file has it;
- rope scaling (`rope.scaling.type` linear with its factor; for Gemma 3 it applies to the
  global layers only), and Phi-3's LongRoPE: `rope.scaling.original_context_length` and the
  per-frequency factors, which llama.cpp stores as the tensors rope_factors_long/short;
- Phi-3's sliding window (`attention.sliding_window`, 0 meaning none);
- Gemma 2 / Gemma 3 27B's query_pre_attn_scalar: hidden / heads where the config default (256)
  holds for the other sizes; llama.cpp tells the 27B models by their layer count, as here.

No torch: the header is read by aphrodite/gguf_reader.py.
"""

from __future__ import annotations

import numpy as np

from aphrodite.gguf_reader import GGUFTensors

_F32 = 0
# Part of the key of cached GGUF configs (model_files): bump when fix_gguf_config changes.
GGUF_CONFIG_FIXES = 1
# llama.cpp's converter: Gemma 2 27B has 46 layers, Gemma 3 27B 62.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _float32_vector(tensors: GGUFTensors, name: str) -> list[float] | None:
    """A float32 tensor's values (None where the file has no such float32 tensor)."""
    tensor = next((t for t in tensors.tensors if t.name == name), None)
    if tensor is None or tensor.tensor_type != _F32:
        return None
    return [float(x) for x in np.asarray(tensor.data).reshape(-1).view("<f4")]


def fix_gguf_config(config, path: str):
    """The config of the GGUF file at `path` with the facts above set; returns it (Mixtral: a
    new MixtralConfig)."""
    header = GGUFTensors(path)
    meta = header.metadata
    arch = meta.get("general.architecture")

    def get(key: str):
        return meta.get(f"{arch}.{key}")

    if get("attention.key_length"):
        config.head_dim = int(get("attention.key_length"))
    if arch == "llama" and (get("expert_count") or 0) > 0:
        config = _mixtral(config, get("expert_count"), get("expert_used_count"))
    if config.model_type in ("qwen2_moe", "qwen3_moe"):
        if get("expert_feed_forward_length"):
            config.moe_intermediate_size = int(get("expert_feed_forward_length"))
        if get("expert_shared_feed_forward_length"):
            config.shared_expert_intermediate_size = int(get("expert_shared_feed_forward_length"))
    if get("expert_weights_norm") is not None:
        config.norm_topk_prob = bool(get("expert_weights_norm"))
    _fix_rope(config, arch, get, header)
    if arch == "phi3" and get("attention.sliding_window") is not None:
        config.sliding_window = int(get("attention.sliding_window")) or None
    if _GEMMA_27B_LAYERS.get(arch) == config.num_hidden_layers:
        config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads
    return config


def _mixtral(config, experts: int, used: int):
    from transformers import AutoConfig

    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    mixtral = AutoConfig.for_model("mixtral", **values)
    mixtral.num_local_experts, mixtral.num_experts_per_tok = int(experts), int(used)
    mixtral.head_dim = getattr(config, "head_dim", None)
    return mixtral


def _fix_rope(config, arch: str, get, header: GGUFTensors) -> None:
    params = dict(getattr(config, "rope_parameters", None) or {})
    # Gemma 3 keys its parameters by layer type; the file's scaling is the global layers'.
    target = params["full_attention"] if "full_attention" in params else params
    scaling, factor = get("rope.scaling.type"), get("rope.scaling.factor")
    if scaling == "linear" and factor:
        target.update(rope_type="linear", factor=float(factor))
    elif scaling == "yarn" and factor:
        # Named, so that the model refuses a scaling it does not apply (layers/rotary.py).
        target.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=int(
            get("rope.scaling.original_context_length") or config.max_position_embeddings))
    long = _float32_vector(header, "rope_factors_long.weight")
    short = _float32_vector(header, "rope_factors_short.weight")
    if arch == "phi3" and get("rope.scaling.original_context_length"):
        original = int(get("rope.scaling.original_context_length"))
        config.original_max_position_embeddings = original
        if long and short:
            # transformers derives the attention factor from the two lengths, as the converter
            # did to write rope.scaling.attn_factor, so it is left to that.
            target.update(rope_type="longrope", long_factor=long, short_factor=short,
                          original_max_position_embeddings=original)
    if params:
        config.rope_parameters = params
