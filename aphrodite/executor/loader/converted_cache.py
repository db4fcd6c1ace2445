"""The converted-weights cache: a GGUF file's HF-named tensors, converted once, kept as safetensors.

Converting a GGUF file (dequantising, un-permuting Q/K rows, rewriting Q4_0 blocks as Q4_1)
happens once per file; later loads read the converted tensors back. An
entry is keyed by the file (model_files.gguf_weights_cache_path) and by cache_variant: the
converter's version and which types were kept quantised. A missing, stale or unreadable entry
means converting again and rewriting it.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

from aphrodite.executor.loader import gguf
from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.model_files import ModelFiles, gguf_weights_cache_path, write_file_atomically

logger = logging.getLogger(__name__)

# Bump when the converted layout or values change: old cache entries then miss.
CONVERTER_VERSION = 3
# An entry is written from all converted tensors at once. For files above this size, holding
# them all dequantised would double peak memory: those stream their float32 tensors instead.
DENSE_CACHE_MAX_FILE = 1 << 30
_SEP = "::"   # entry names: "<hf name>" (dense) or "<hf name>::blocks" (quantised)


def converts_in_one_piece(path: str) -> bool:
    return os.path.getsize(path) <= DENSE_CACHE_MAX_FILE


def cache_variant(quantized: tuple[int, ...]) -> str:
    """The entry's name: what was converted, and how (quantized: the GGUF types kept)."""
    if not quantized:
        return f"v{CONVERTER_VERSION}-dense"
    return f"v{CONVERTER_VERSION}-q{'.'.join(str(int(t)) for t in sorted(quantized))}"


def load_gguf_converted(files: ModelFiles, quantized: tuple[int, ...], progress: bool
                        ) -> dict[str, torch.Tensor | QuantizedParts]:
    """All HF-named tensors of a GGUF file (those of the `quantized` types as QuantizedParts),
    from the cache when a valid entry exists."""
    path = gguf_weights_cache_path(files, cache_variant(quantized))
    if path.is_file():
        start = time.perf_counter()
        try:
            tensors = _read(path)
            logger.info("Loaded converted weights from %s in %.1f s", path, time.perf_counter() - start)
            return tensors
        except Exception as exc:   # corrupt or foreign file: convert again
            logger.warning("Ignoring unreadable weights cache %s (%s); converting again", path, exc)
    start = time.perf_counter()
    tensors = dict(gguf.iter_gguf(files.gguf_path, progress, quantized))
    logger.info("Converted the GGUF weights in %.1f s", time.perf_counter() - start)
    if write_file_atomically(path, lambda tmp: _write(tmp, tensors)):
        logger.info("Cached the converted weights in %s", path)
    return tensors


def _write(tmp: str, tensors: dict[str, torch.Tensor | QuantizedParts]) -> None:
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    quantized: dict[str, list[int]] = {}   # name -> [ggml type, columns]
    for name, value in tensors.items():
        if isinstance(value, QuantizedParts):
            quantized[name] = [int(value.ggml_type), value.cols]
            arrays[name + _SEP + "blocks"] = np.ascontiguousarray(value.blocks)
        else:
            arrays[name] = value.numpy()
    save_file(arrays, tmp, metadata={"converter": str(CONVERTER_VERSION),
                                     "quantized": json.dumps(quantized)})


def _read(path) -> dict[str, torch.Tensor | QuantizedParts]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("converter") != str(CONVERTER_VERSION):
            raise ValueError(f"converter version {meta.get('converter')!r}")
        tensors: dict[str, torch.Tensor | QuantizedParts] = {}
        for name in sorted(k for k in f.keys() if _SEP not in k):
            tensors[name] = torch.from_numpy(f.get_tensor(name))
        for name, (ggml_type, cols) in json.loads(meta["quantized"]).items():
            tensors[name] = QuantizedParts(ggml_type, f.get_tensor(name + _SEP + "blocks"), cols)
    return tensors
