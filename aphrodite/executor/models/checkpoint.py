"""The steps every model's load_weights shares around its own name mapping: fill each slot,
check nothing is missing, tie or prepare the output matrix, and give each weight the format
its kernel wants."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from aphrodite.executor.layers import linear
from aphrodite.executor.layers.parallel_linear import finish_loading
from aphrodite.executor.layers.quantized import QuantizedParts
from aphrodite.executor.layers.weights import expected_slots, replace_parameter

Weight = torch.Tensor | QuantizedParts


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, Weight]],
                    load_one: Callable[[str, Weight], str | None]) -> None:
    """Fill `model` (with embed_tokens and lm_head, None when tied) from HF-named tensors;
    load_one(name, value) loads one and returns the slot it filled (see expected_slots)."""
    expected = expected_slots(model)
    loaded: set[str] = set()
    for name, value in weights:
        try:
            slot = load_one(name, value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        if slot is not None:
            loaded.add(slot)
    if model.lm_head is not None and "lm_head" not in loaded:
        model.lm_head = None  # checkpoint without an output matrix: tied embeddings
    missing = expected - loaded - ({"lm_head"} if model.lm_head is None else set())
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:8]}")
    finish_loading(model)
    if model.lm_head is not None:
        replace_parameter(model, "lm_head", linear.prepare_weight(model.lm_head))
    elif linear.packs_for_onednn(model.embed_tokens):
        # Tied: the lookup needs the plain rows, so lm_head is a packed copy (vocab x hidden
        # more memory, for an lm_head 1.7x faster at 64 tokens).
        replace_parameter(model, "lm_head", linear.pack_weight(model.embed_tokens.detach()))
