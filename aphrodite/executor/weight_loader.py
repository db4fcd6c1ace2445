"""Stream a model's weights as (HF parameter name, tensor) pairs from safetensors or GGUF."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aphrodite.model_files import ModelFiles

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
}
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors instead of config keys.
GGUF_ROPE_FREQS_NAME = "model.rotary_emb.rope_freqs"
# Precomputed rotary tables some old conversions carry; we compute our own.
_GGUF_IGNORED = re.compile(r"^(blk\.\d+\.attn_rot_embd|rope_factors_(long|short))(\.weight)?$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GGUF_GLOBAL = re.compile(r"^(\w+)\.(weight|bias)$")


def iter_weights(files: ModelFiles, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every weight of the model under its HF name, one tensor at a time."""
    if files.is_gguf:
        yield from _iter_gguf(files.gguf_path, progress)
    else:
        yield from _iter_safetensors(Path(files.path), progress)


# ---------------------------------------------------------------------------------------------
# safetensors


def safetensors_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [folder / name for name in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return shards


def _iter_safetensors(folder: Path, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    shards = safetensors_shards(folder)
    handles = [safe_open(str(shard), framework="pt") for shard in shards]
    total = sum(len(h.keys()) for h in handles)
    with tqdm(total=total, desc="Loading safetensors weights", unit="tensor",
              disable=not progress) as bar:
        for handle in handles:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
                bar.update(1)


# ---------------------------------------------------------------------------------------------
# GGUF


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """HF name of a GGUF tensor; None for tensors we do not need."""
    if gguf_name in ("rope_freqs.weight", "rope_freqs"):
        return GGUF_ROPE_FREQS_NAME
    if _GGUF_IGNORED.match(gguf_name):
        return None
    match = _GGUF_LAYER.match(gguf_name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
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


def _iter_gguf(path: str, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    from aphrodite.executor.gguf_tensors import GGUFTensors

    gguf_file = GGUFTensors(path)
    meta = gguf_file.metadata
    arch = meta["general.architecture"]
    # Only llama.cpp's Llama converter (Llama, Mistral, SmolLM, ...) permutes Q/K.
    permuted = arch == "llama"
    n_heads = meta[f"{arch}.attention.head_count"]
    n_kv_heads = meta.get(f"{arch}.attention.head_count_kv", n_heads)
    for tensor in tqdm(gguf_file.tensors, desc="Loading GGUF weights", unit="tensor",
                       disable=not progress):
        name = gguf_to_hf_name(tensor.name)
        if name is None:
            continue
        array = dequantize(tensor.data, tensor.tensor_type).reshape(tensor.shape)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = unpermute_qk(array, n_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = unpermute_qk(array, n_kv_heads)
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = np.array(array)  # F32 tensors are views into the read-only memory map
        yield name, torch.from_numpy(array)
