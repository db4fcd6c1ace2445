"""Tiny GGUF files for the tests, written as llama.cpp's converter would, from a transformers
model's state dict: the metadata all architectures share, each tensor under its GGUF name,
matrices optionally quantised."""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

F32 = gguf.GGMLQuantizationType.F32
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                "lm_head.weight": "output.weight", "model.norm.weight": "output_norm.weight"}


def gguf_name(name: str, layer_names: dict[str, str]) -> str:
    """A transformers tensor name in GGUF's naming (layer_names: module -> GGUF name)."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{layer_names[module]}.{kind}"


def write_gguf(path, arch: str, hf_model, layer_names: dict[str, str], quant=F32,
               convert: Callable[[str, np.ndarray], np.ndarray | None] = lambda n, a: a,
               metadata: Callable[[gguf.GGUFWriter], None] = lambda writer: None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> str:
    """convert(name, array): the array as the converter stores it, or None to leave the tensor
    out; metadata(writer): the architecture's own keys."""
    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    metadata(writer)
    for name, tensor in hf_model.state_dict().items():
        array = convert(name, tensor.numpy())
        if array is None:
            continue
        if array.ndim == 2 and quant != F32:
            writer.add_tensor(gguf_name(name, layer_names), gguf.quants.quantize(array, quant),
                              raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name(name, layer_names), array)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
