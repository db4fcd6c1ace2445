"""Loading a model's weights: files in, HF-named tensors (or QuantizedParts) out to the model.

The loader knows file formats: safetensors shards (safetensors.py), GGUF files with their
tensor names and Q/K row order (gguf.py), the converted-weights cache (converted_cache.py) and
which GGUF matrices stay quantised (quantization.py). The model alone knows how HF names map
to its parameters (its load_weights), stacked and quantised ones included.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from aphrodite.executor.loader import converted_cache, gguf
from aphrodite.executor.loader.quantization import (add_large_call_operands, quantization_mode,
                                                    quantized_types)
from aphrodite.executor.loader.safetensors import iter_safetensors
from aphrodite.model_files import ModelFiles


def iter_weights(files: ModelFiles, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every weight of the model under its HF name, one float tensor at a time."""
    if files.is_gguf:
        yield from gguf.iter_gguf(files.gguf_path, progress)
    else:
        yield from iter_safetensors(Path(files.path), progress)


def load_model_weights(model, files: ModelFiles, config, device, progress: bool = True) -> None:
    """Fill `model` with the checkpoint's weights.

    GGUF files are converted once and the result cached (converted_cache.py); in a quantised
    mode (quantization.py) the matrices kept quantised reach model.load_weights as
    QuantizedParts, and in "int4+dense" mode each gets its operand for calls of many tokens.
    Other files, and GGUF files too large to convert in one piece without quantisation, stream
    their tensors straight into the model.
    """
    mode = quantization_mode(config, files, device, model)
    if not files.is_gguf or (mode == "none"
                             and not converted_cache.converts_in_one_piece(files.gguf_path)):
        model.load_weights(iter_weights(files, progress))
        return
    quantized = quantized_types() if mode != "none" else ()
    model.load_weights(converted_cache.load_gguf_converted(files, quantized, progress).items())
    if mode == "int4+dense":
        add_large_call_operands(model)
