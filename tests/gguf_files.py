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


def add_shape_keys(writer: gguf.GGUFWriter, config) -> None:
    """The keys every llama.cpp converter writes from a config (TextModel.set_gguf_parameters)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def write_gguf(path, arch: str, hf_model, layer_names: dict[str, str], quant=F32,
               convert: Callable[[str, np.ndarray], np.ndarray | None] = lambda n, a: a,
               metadata: Callable[[gguf.GGUFWriter], None] = lambda writer: None,
               extra_tensors: dict[str, np.ndarray] | None = None,
               split: Callable[[str, np.ndarray], list[tuple[str, np.ndarray]] | None]
               = lambda n, a: None) -> str:
    """convert(name, array): the array as the converter stores it, or None to leave the tensor
    out; metadata(writer): the architecture's own keys; split(name, array): the GGUF tensors
    [(GGUF name, array)] that one tensor becomes where it is not one tensor under its GGUF name
    (stacked experts), else None. Matrices and stacked experts are stored as `quant`, except
    the router (ffn_gate_inp), which llama.cpp's quantiser keeps as it is."""
    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    add_shape_keys(writer, config)
    metadata(writer)
    for name, tensor in hf_model.state_dict().items():
        array = convert(name, tensor.numpy())
        if array is None:
            continue
        for target, part in split(name, array) or [(gguf_name(name, layer_names), array)]:
            if part.ndim >= 2 and quant != F32 and ".ffn_gate_inp." not in target:
                writer.add_tensor(target, gguf.quants.quantize(part, quant), raw_dtype=quant)
            else:
                writer.add_tensor(target, part)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Q/K rows in the order llama.cpp's Llama converter stores them (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def add_byte_tokenizer(writer: gguf.GGUFWriter, bos: int = 1, eos: int = 2) -> None:
    """A 256-token byte-level BPE vocabulary without merges: what transformers needs to build a
    GGUF file's tokenizer (the engine loads it), for models of vocabulary size 256."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
