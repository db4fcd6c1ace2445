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

    In a quantised mode (quantization.py) the GGUF matrices kept quantised reach
    model.load_weights as QuantizedParts, and in "int4+dense" mode each gets its operand for
    calls of many tokens. GGUF files small enough to convert in one piece are converted once
    and the result cached (converted_cache.py); larger files, and other formats, stream their
    tensors into the model one at a time, so loading never holds much more than the model.
    """
    mode = quantization_mode(config, files, device, model)
    if not files.is_gguf:
        model.load_weights(iter_weights(files, progress))
        return
    quantized = quantized_types() if mode != "none" else ()
    if converted_cache.converts_in_one_piece(files.gguf_path):
        tensors = converted_cache.load_gguf_converted(files, quantized, progress).items()
    else:
        tensors = gguf.iter_gguf(files.gguf_path, progress, quantized)
    model.load_weights(tensors)
    if mode == "int4+dense":
        add_large_call_operands(model)
