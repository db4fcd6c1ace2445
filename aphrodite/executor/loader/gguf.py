"""GGUF files' tensors under HF names: llama.cpp's tensor names and Q/K row order (the file's
header and tensor table: aphrodite/gguf_reader.py).

iter_gguf yields the tensors under their HF names, Q/K rows back in HF's order, as float32
or, for matrices of the types asked for, as QuantizedParts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from aphrodite.executor.layers.quantized import QuantizedParts, parts_from_gguf
from aphrodite.gguf_reader import GGUFTensor, GGUFTensors

# ---------------------------------------------------------------------------------------------
# Names and row order

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",   # Qwen3's QK-norm
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",    # Phi-3's fused q, k, v rows
    # Mixture of experts: the router, and the experts stacked [experts, rows, cols], which
    # iter_gguf yields one expert at a time (mlp.experts.E.gate_proj, ...); Qwen2-MoE's shared
    # expert and its gate (one row, stored as a vector).
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Per architecture, where a name means another module than in Llama: Gemma 2/3 have four norms
# a layer, and llama.cpp's ffn_norm is their pre-feedforward one.
_GGUF_ARCH_LAYER_NAMES = {arch: {"post_attention_norm": "post_attention_layernorm",
                                 "ffn_norm": "pre_feedforward_layernorm",
                                 "post_ffw_norm": "post_feedforward_layernorm"}
                          for arch in ("gemma2", "gemma3")}
# Phi-3's ffn_up holds gate then up, as HF's gate_up_proj.
_GGUF_ARCH_LAYER_NAMES["phi3"] = {"ffn_up": "mlp.gate_up_proj"}
# Architectures whose norm weights llama.cpp's converter stores as 1 + w where HF stores w.
_GGUF_NORM_PLUS_ONE = ("gemma2", "gemma3")
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors instead of config keys.
GGUF_ROPE_FREQS_NAME = "model.rotary_emb.rope_freqs"
# Precomputed rotary tables some old conversions carry; we compute our own. Phi-3's LongRoPE
# factors are read into the config (gguf_config.py).
_GGUF_IGNORED = re.compile(r"^(blk\.\d+\.attn_rot_embd|rope_factors_(long|short))(\.weight)?$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Mixtral files from llama.cpp's converter before stacked experts: one matrix per expert.
_GGUF_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_GGUF_GLOBAL = re.compile(r"^(\w+)\.(weight|bias)$")
# Matrices that can stay quantised, by HF name: those multiplied through linear() (the layers'
# projections, the output matrix) and the embedding, which is looked up row by row (and is the
# output matrix too when they are tied).
_QUANTIZABLE_NAME = re.compile(r"^(model\.layers\.\d+\.(self_attn\.([qkvo]|qkv)_proj"
                               r"|mlp\.(shared_expert\.)?(gate|up|down|gate_up)_proj)"
                               r"|model\.embed_tokens|lm_head)\.weight$")


def gguf_to_hf_name(gguf_name: str, arch: str | None = None) -> str | None:
    """HF name of a GGUF tensor of a model of GGUF architecture `arch`; None for tensors we do
    not need."""
    if gguf_name in ("rope_freqs.weight", "rope_freqs"):
        return GGUF_ROPE_FREQS_NAME
    if _GGUF_IGNORED.match(gguf_name):
        return None
    layer_names = {**_GGUF_LAYER_NAMES, **_GGUF_ARCH_LAYER_NAMES.get(arch, {})}
    match = _GGUF_EXPERT.match(gguf_name)
    if match:
        layer, matrix, expert = match.groups()
        return f"model.layers.{layer}.mlp.experts.{expert}.{matrix}_proj.weight"
    match = _GGUF_LAYER.match(gguf_name)
    if match and match.group(2) in layer_names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{layer_names[part]}.{kind}"
    match = _GGUF_GLOBAL.match(gguf_name)
    if match and match.group(1) in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF equivalent")


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (or bias entries).

    llama.cpp's converter reorders each head's rows from HF's "first half, second half" rotary
    layout to interleaved pairs: HF row (h, i, j) with i in {0, 1} (which half), j < head_dim/2
    is stored as row (h, j, i). Reading the rows as (h, j, i) and swapping back restores HF order.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def expert_tensors(name: str, tensor: GGUFTensor) -> Iterator[tuple[str, torch.Tensor]]:
    """A stacked experts tensor [experts, rows, cols] (HF name model.layers.N.mlp.experts.<m>)
    as one float32 matrix per expert (model.layers.N.mlp.experts.E.<m>.weight), dequantised one
    expert at a time, so that loading holds one expert's float32 copy beyond the model."""
    from gguf.quants import dequantize

    prefix, matrix = name.removesuffix(".weight").rsplit(".", 1)
    for expert, rows in enumerate(tensor.data):
        array = np.array(dequantize(rows, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(tensor.shape[1:])
        yield f"{prefix}.{expert}.{matrix}.weight", torch.from_numpy(array)


def iter_gguf(path: str, progress: bool, quantize: tuple[int, ...] = ()
              ) -> Iterator[tuple[str, torch.Tensor | QuantizedParts]]:
    """HF-named tensors of a GGUF file; matrices stored in one of the `quantize` types come out
    as QuantizedParts instead of dequantised float32. Each tensor's pages of the mapped file
    are released once the consumer has taken it, so the file does not stay resident beside the
    model it loads (a view still held refaults its pages from the file)."""
    gguf_file = GGUFTensors(path)
    meta = gguf_file.metadata
    arch = meta["general.architecture"]
    n_heads = meta[f"{arch}.attention.head_count"]
    n_kv_heads = meta.get(f"{arch}.attention.head_count_kv", n_heads)
    for tensor in tqdm(gguf_file.tensors, desc="Loading GGUF weights", unit="tensor",
                       disable=not progress):
        name = gguf_to_hf_name(tensor.name, arch)
        if name is None:
            continue
        yield from _hf_tensors(tensor, name, arch, n_heads, n_kv_heads, quantize)
        gguf_file.release(tensor)


def _hf_tensors(tensor: GGUFTensor, name: str, arch: str, n_heads: int, n_kv_heads: int,
                quantize: tuple[int, ...]) -> Iterator[tuple[str, torch.Tensor | QuantizedParts]]:
    """One GGUF tensor as the HF-named tensors it holds."""
    from gguf.quants import dequantize

    if len(tensor.shape) == 3:
        yield from expert_tensors(name, tensor)
        return
    heads = None
    if arch == "llama":   # only llama.cpp's Llama converter (Llama, Mistral, ...) permutes Q/K
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_heads
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv_heads
    if tensor.tensor_type in quantize and _QUANTIZABLE_NAME.match(name):
        parts = parts_from_gguf(tensor.data, tensor.tensor_type, tensor.shape)
        if heads is not None:   # the permutation moves whole rows of blocks
            parts = parts.take_rows(unpermute_qk(np.arange(tensor.shape[0]), heads))
        yield name, parts
        return
    array = dequantize(tensor.data, tensor.tensor_type).reshape(tensor.shape)
    if heads is not None:
        array = unpermute_qk(array, heads)
    if arch in _GGUF_NORM_PLUS_ONE and name.endswith("norm.weight"):
        array = array - 1   # back to HF's w, as transformers' GGUF loading does
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array)  # F32 tensors are views into the read-only memory map
    yield name, torch.from_numpy(array)
