"""HF checkpoints: every tensor of a folder's safetensors shards, under its own (HF) name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm


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


def iter_safetensors(folder: Path, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
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
