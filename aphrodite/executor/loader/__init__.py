"""Stream a model's weights as (HF parameter name, tensor) pairs from safetensors or GGUF."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.quantized import (INT4_TYPES, Q8_0, QuantizedParts,
                                                 QuantizedWeight, parts_from_gguf)
from aphrodite.model_files import ModelFiles, gguf_weights_cache_path, write_file_atomically

logger = logging.getLogger(__name__)

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


def _iter_gguf(path: str, progress: bool, quantize: tuple[int, ...] = ()
               ) -> Iterator[tuple[str, torch.Tensor | QuantizedParts]]:
    """HF-named tensors of a GGUF file; matrices stored in one of the `quantize` types come out
    as QuantizedParts instead of dequantised float32."""
    from gguf.quants import dequantize

    from aphrodite.executor.loader.gguf_file import GGUFTensors

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
        heads = None
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_heads
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv_heads
        if tensor.tensor_type in quantize and _QUANTIZED_NAME.match(name):
            parts = parts_from_gguf(tensor.data, tensor.tensor_type, tensor.shape)
            if heads is not None:   # the permutation moves whole rows: codes and scales alike
                parts = parts.take_rows(unpermute_qk(np.arange(tensor.shape[0]), heads))
            yield name, parts
            continue
        array = dequantize(tensor.data, tensor.tensor_type).reshape(tensor.shape)
        if heads is not None:
            array = unpermute_qk(array, heads)
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = np.array(array)  # F32 tensors are views into the read-only memory map
        yield name, torch.from_numpy(array)


# ---------------------------------------------------------------------------------------------
# Loading into a model: converted-weights cache and weight-only quantisation

# Bump when the converted layout or values change: old cache entries then miss.
CONVERTER_VERSION = 2
DENSE_CACHE_MAX_FILE = 1 << 30
# Matrices the model multiplies with F.linear (its fused projections, the output matrix), by HF
# name; the embedding, which is also the output matrix when they are tied.
_QUANTIZED_NAME = re.compile(r"^(model\.layers\.\d+\.(self_attn\.[qkvo]_proj"
                             r"|mlp\.(gate|up|down)_proj)|model\.embed_tokens|lm_head)\.weight$")


def quantized_types() -> tuple[int, ...]:
    """GGUF types kept quantised: Q4 always; Q8_0 only with the C++ kernel, since torch's int8
    kernel takes one scale per row, not per block."""
    return (*INT4_TYPES, Q8_0) if cpu_kernels.library_available() else INT4_TYPES


def cache_variant(quantize: bool) -> str:
    """The converted-weights cache entry's name: what was converted, and how."""
    if not quantize:
        return f"v{CONVERTER_VERSION}-dense"
    return f"v{CONVERTER_VERSION}-{'q4q8' if Q8_0 in quantized_types() else 'int4'}"


# auto keeps the float32 copy only while it takes at most this share of the available memory.
DENSE_COPY_MAX_SHARE = 0.5


def available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def quantization_mode(config, files: ModelFiles, device, model) -> str:
    """How a model's GGUF matrices are held: "none" (float32), "int4" (quantised only) or
    "int4+dense" (both: quantised for decode steps of a few tokens, float32 for the rest; on
    CPUs with AMX, int4 matrices' "rest" is AMX operand tiles, as large and float32-accurate).

    Quantised execution needs a GGUF model on CPU in float32 without tensor parallelism.
    "auto" holds both when the C++ kernels are there: the float32 copy costs 4 bytes a weight
    on top of GGUF's ~0.6, and buys float32 GEMM speed for prefill and large decode batches,
    where the weight-only kernels lose. If that copy would fill more than
    DENSE_COPY_MAX_SHARE of the available memory, auto keeps the blocks only. Without the C++
    kernels auto means none: torch's int4 kernel rounds activations to bfloat16 (see
    quantized_linear.py). So does a file over DENSE_CACHE_MAX_FILE: quantised loading converts
    and caches the whole file in one piece, and k-quant files (Q4_K, Q6_K, ...) are mostly
    tensors this path does not keep quantised.
    """
    if config.quantization == "none" or not files.is_gguf:
        return "none"
    supported = (torch.device(device).type == "cpu"
                 and getattr(model, "dtype", None) == torch.float32
                 and getattr(model, "tp_size", 1) == 1 and hasattr(model, "layers"))
    if not supported:
        if config.quantization == "int4":
            logger.warning("--quantization int4 needs a GGUF model on CPU in float32 without "
                           "tensor parallelism; loading dequantised weights instead")
        return "none"
    if config.quantization == "int4":
        return "int4"
    if (not cpu_kernels.library_available()
            or os.path.getsize(files.gguf_path) > DENSE_CACHE_MAX_FILE):
        return "none"   # larger files stream their float32 tensors (see load_model_weights)
    from aphrodite.executor.loader.gguf_file import GGUFTensors
    dense_bytes = 4 * sum(int(np.prod(t.shape)) for t in GGUFTensors(files.gguf_path).tensors)
    if dense_bytes > DENSE_COPY_MAX_SHARE * available_ram():
        logger.info("Keeping the GGUF weights quantised only: a float32 copy would take "
                    "%.1f GiB of %.1f GiB available", dense_bytes / 2**30, available_ram() / 2**30)
        return "int4"
    return "int4+dense"


def load_model_weights(model, files: ModelFiles, config, device, progress: bool = True) -> None:
    """Fill `model` with the checkpoint's weights.

    GGUF files are converted once and the result cached as safetensors (see load_gguf_converted);
    with quantisation on, the quantised matrices then replace the model's float ones as
    QuantizedWeight tensors, which the model's linear calls run with weight-only kernels (and,
    in "int4+dense" mode, with a float32 copy for calls of many tokens).
    """
    mode = quantization_mode(config, files, device, model)
    quantize = mode != "none"
    # The cache is written from all converted tensors at once: for big dequantised GGUF
    # models that would double peak memory, so those stream as before.
    if not files.is_gguf or (not quantize and os.path.getsize(files.gguf_path) > DENSE_CACHE_MAX_FILE):
        model.load_weights(iter_weights(files, progress))
        return
    tensors = load_gguf_converted(files, quantize, progress)
    quantized = {n: t for n, t in tensors.items() if isinstance(t, QuantizedParts)}
    dense = ((n, t) for n, t in tensors.items() if not isinstance(t, QuantizedParts))
    # load_weights checks that every weight arrives; the quantised ones arrive as zero
    # placeholders (a broadcast scalar, no memory) and are swapped out right after.
    placeholders = ((n, torch.zeros(()).expand(p.shape)) for n, p in quantized.items())
    model.load_weights(chain(dense, placeholders))
    if quantized:
        swap_in_quantized(model, quantized, tied="lm_head.weight" not in tensors)
    if mode == "int4+dense":
        # Plain float32, multiplied by MKL (F.linear), not packed for oneDNN: the copy only
        # serves calls above KERNEL_MAX_TOKENS, and there MKL is the faster one (all linears
        # of the default model, ms, MKL vs oneDNN: 512 tokens 642 vs 681, 2048: 2489 vs 2749).
        # AMX tiles beat both (see kernels/amx_linear.h).
        for weight in quantized_weights(model):
            if weight.kind == "int4" and weight.out_features % 32 == 0 \
                    and cpu_kernels.amx_available():
                weight.amx = cpu_kernels.amx_pack(weight.blocks, weight.in_features)
            else:
                weight.dense = weight.dequantize()


def swap_in_quantized(model, quantized: dict[str, QuantizedParts], tied: bool) -> None:
    """Replace the model's matrices with QuantizedWeight tensors where quantised parts exist."""
    for attr in ("embed_tokens", "lm_head"):
        name = "model.embed_tokens.weight" if attr == "embed_tokens" else "lm_head.weight"
        if name in quantized:
            model._parameters.pop(attr, None)
            setattr(model, attr, QuantizedWeight(quantized[name]))
    if tied and "model.embed_tokens.weight" in quantized:
        model.lm_head = None   # not the float copy packed from the placeholder


    fused = {"self_attn": {"qkv_weight": ("q_proj", "k_proj", "v_proj"), "o_weight": ("o_proj",)},
             "mlp": {"gate_up_weight": ("gate_proj", "up_proj"), "down_weight": ("down_proj",)}}
    for index, layer in enumerate(model.layers):
        for block, targets in fused.items():
            module = getattr(layer, block)
            for attr, projections in targets.items():
                names = [f"model.layers.{index}.{block}.{p}.weight" for p in projections]
                if not all(n in quantized for n in names):
                    continue
                weight = QuantizedWeight(QuantizedParts.cat_rows([quantized[n] for n in names]))
                if tuple(weight.shape) != tuple(getattr(module, attr).shape):
                    raise ValueError(f"layer {index} {attr}: quantised shape {tuple(weight.shape)} "
                                     f"!= {tuple(getattr(module, attr).shape)}")
                module._parameters.pop(attr, None)   # a plain attribute from now on
                setattr(module, attr, weight)


def quantized_weights(model) -> list[QuantizedWeight]:
    """Every QuantizedWeight the model holds (its projections, embedding, output matrix)."""
    modules = [model, *(m for layer in model.layers for m in (layer.self_attn, layer.mlp))]
    return [w for m in modules for w in vars(m).values() if isinstance(w, QuantizedWeight)]


def load_gguf_converted(files: ModelFiles, quantize: bool, progress: bool
                        ) -> dict[str, torch.Tensor | QuantizedParts]:
    """All HF-named tensors of a GGUF file, from the cache when a valid entry exists.

    A missing, stale (other key) or unreadable entry means converting again and rewriting it."""
    path = gguf_weights_cache_path(files, cache_variant(quantize))
    if path.is_file():
        start = time.perf_counter()
        try:
            tensors = _read_cache(path)
            logger.info("Loaded converted weights from %s in %.1f s", path, time.perf_counter() - start)
            return tensors
        except Exception as exc:   # corrupt or foreign file: convert again
            logger.warning("Ignoring unreadable weights cache %s (%s); converting again", path, exc)
    start = time.perf_counter()
    tensors = dict(_iter_gguf(files.gguf_path, progress, quantized_types() if quantize else ()))
    logger.info("Converted the GGUF weights in %.1f s", time.perf_counter() - start)
    if write_file_atomically(path, lambda tmp: _write_cache(tmp, tensors)):
        logger.info("Cached the converted weights in %s", path)
    return tensors


_SEP = "::"   # cache entry names: "<hf name>" (dense) or "<hf name>::codes|scales|mins"


def _write_cache(tmp: str, tensors: dict[str, torch.Tensor | QuantizedParts]) -> None:
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for name, value in tensors.items():
        if isinstance(value, QuantizedParts):
            kinds[name] = value.kind
            codes = value.codes
            if value.kind == "int4":   # two codes a byte on disk
                codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
            arrays[name + _SEP + "codes"] = np.ascontiguousarray(codes)
            arrays[name + _SEP + "scales"] = np.ascontiguousarray(value.scales)
            if value.mins is not None:
                arrays[name + _SEP + "mins"] = np.ascontiguousarray(value.mins)
        else:
            arrays[name] = value.numpy()
    save_file(arrays, tmp, metadata={"converter": str(CONVERTER_VERSION), "kinds": json.dumps(kinds)})


def _read_cache(path) -> dict[str, torch.Tensor | QuantizedParts]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("converter") != str(CONVERTER_VERSION):
            raise ValueError(f"converter version {meta.get('converter')!r}")
        kinds = json.loads(meta["kinds"])
        keys = set(f.keys())
        tensors: dict[str, torch.Tensor | QuantizedParts] = {}
        for name in sorted(k for k in keys if _SEP not in k):
            tensors[name] = torch.from_numpy(f.get_tensor(name))
        for name, kind in kinds.items():
            codes = f.get_tensor(name + _SEP + "codes")
            if kind == "int4":
                codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(codes.shape[0], -1)
            mins = f.get_tensor(name + _SEP + "mins") if name + _SEP + "mins" in keys else None
            tensors[name] = QuantizedParts(kind, codes, f.get_tensor(name + _SEP + "scales"), mins)
    return tensors
