"""Token histories (prompt + output) as numpy arrays, cached per row across steps.

The penalties, DRY, no-repeat-ngram and bad words all read a row's history every step.
Converting a long Python list each step would dominate their cost, so the array lives in
``row.state`` and only the new output tokens are copied in.
"""

from __future__ import annotations

import numpy as np
import torch

_KEY = "_token_history"


class _History:
    __slots__ = ("buffer", "length", "prompt_len")

    def __init__(self, prompt: list[int], output: list[int]):
        total = len(prompt) + len(output)
        self.buffer = np.empty(max(64, 2 * total), dtype=np.int64)
        self.buffer[:len(prompt)] = prompt
        self.buffer[len(prompt):total] = output
        self.length = total
        self.prompt_len = len(prompt)


def token_history(row) -> np.ndarray:
    """The row's prompt + output token ids (a view: read it, do not keep it across steps)."""
    prompt, output = row.prompt_token_ids, row.output_token_ids
    total = len(prompt) + len(output)
    hist = row.state.get(_KEY)
    if hist is None or hist.prompt_len != len(prompt) or hist.length > total:
        hist = row.state[_KEY] = _History(prompt, output)
    elif hist.length < total:
        if total > hist.buffer.shape[0]:
            grown = np.empty(2 * total, dtype=np.int64)
            grown[:hist.length] = hist.buffer[:hist.length]
            hist.buffer = grown
        hist.buffer[hist.length:total] = output[hist.length - hist.prompt_len:]
        hist.length = total
    return hist.buffer[:total]


def padded(arrays: list[np.ndarray], pad: int, device: torch.device) -> torch.Tensor:
    """Stack 1-D int arrays into an [R, max_len] long tensor, padding with ``pad``."""
    width = max(1, max(len(a) for a in arrays))
    out = np.full((len(arrays), width), pad, dtype=np.int64)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return torch.from_numpy(out).to(device, non_blocking=True)
