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

No torch: the reader below takes the scalar metadata and the tensor table in one pass over the
header, stepping over arrays (gguf.GGUFReader would parse every token string: about 10 s on
Gemma 3's 262k-token vocabulary). The format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_F32 = 0
# Part of the key of cached GGUF configs (model_files): bump when fix_gguf_config changes.
GGUF_CONFIG_FIXES = 1
# llama.cpp's converter: Gemma 2 27B has 46 layers, Gemma 3 27B 62.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


class GGUFHeader:
    """A GGUF file's scalar metadata (`metadata`) and its float32 vectors by name (`vector`)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self._buf = f.read(1 << 20)
            self._pos = 0
            self.metadata: dict[str, object] = {}
            self._tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}
            while True:
                try:
                    self._parse()
                    break
                except struct.error:   # the header goes on past what was read: read more
                    f.seek(0)
                    self._buf = f.read(2 * len(self._buf))
                    self._pos = 0

    def _parse(self) -> None:
        magic, _version, tensor_count, kv_count = self._unpack("<4sIQQ")
        if magic != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file")
        for _ in range(kv_count):
            key = self._string()
            (value_type,) = self._unpack("<I")
            value = self._value(value_type)
            if value is not None:
                self.metadata[key] = value
        for _ in range(tensor_count):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            self._tensors[name] = (dims, *self._unpack("<IQ"))
        alignment = int(self.metadata.get("general.alignment", 32))
        self._data_start = -(-self._pos // alignment) * alignment

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        if self._pos + length > len(self._buf):
            raise struct.error("string past the buffer")
        text = self._buf[self._pos:self._pos + length].decode("utf-8", errors="replace")
        self._pos += length
        return text

    def _value(self, value_type: int):
        if value_type in _SCALARS:
            return self._unpack(_SCALARS[value_type])[0]
        if value_type == _STRING:
            return self._string()
        item_type, count = self._unpack("<IQ")
        if item_type in _SCALARS:
            self._pos += count * struct.calcsize(_SCALARS[item_type])
        else:
            for _ in range(count):
                self._value(item_type)
        return None

    def vector(self, name: str) -> list[float] | None:
        """A float32 tensor's values (None where the file has no such float32 tensor)."""
        if name not in self._tensors or self._tensors[name][1] != _F32:
            return None
        dims, _, offset = self._tensors[name]
        count = int(np.prod(dims))
        data = np.fromfile(self.path, dtype="<f4", count=count, offset=self._data_start + offset)
        return [float(x) for x in data]


def fix_gguf_config(config, path: str):
    """The config of the GGUF file at `path` with the facts above set; returns it (Mixtral: a
    new MixtralConfig)."""
    header = GGUFHeader(path)
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


def _fix_rope(config, arch: str, get, header: GGUFHeader) -> None:
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
    long = header.vector("rope_factors_long.weight")
    short = header.vector("rope_factors_short.weight")
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
