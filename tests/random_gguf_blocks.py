"""Random valid GGUF blocks of the types the CPU kernels multiply, for the kernel tests.

gguf can quantise only some types (not the K-quants), and random bytes are valid blocks as
long as their float16 fields are finite: so every byte is random except the float16 scales
(d, Q4_1's m, the K-quants' dmin), which are small finite values of both signs, some of them
float16 subnormals (which the portable build widens by hand)."""

import numpy as np
import torch

from aphrodite.executor.layers.quantized import BLOCKS, Q4_1, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0

# Byte offsets of each type's float16 scale d and offset (Q4_1's m, the K-quants' dmin).
SCALE_AT = {Q4_1: 0, Q5_0: 0, Q8_0: 0, Q4_K: 0, Q5_K: 0, Q6_K: 208}
OFFSET_AT = {Q4_1: 2, Q4_K: 2, Q5_K: 2}
TYPES = {"q4_1": Q4_1, "q5_0": Q5_0, "q8_0": Q8_0, "q4_k": Q4_K, "q5_k": Q5_K, "q6_k": Q6_K}


def random_blocks(ggml_type: int, rows: int, cols: int, seed: int) -> torch.Tensor:
    """uint8 [rows, bytes per row]: a [rows, cols] matrix of random ggml_type blocks."""
    values, size = BLOCKS[ggml_type]
    rng = np.random.default_rng(seed)
    n = rows * cols // values
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    # K-quant scales are d times a 6- or 8-bit integer: smaller d keeps weights near 0.1-1.
    top = 2e-2 if values == 32 else 2e-3
    d = (rng.uniform(top / 20, top, n) * rng.choice([-1, 1], n)).astype(np.float16)
    d[::17] = np.float16(3e-6)
    blocks[:, SCALE_AT[ggml_type]:SCALE_AT[ggml_type] + 2] = d.view(np.uint8).reshape(n, 2)
    if ggml_type in OFFSET_AT:
        m = (rng.uniform(-0.1, 0.1, n) * (1 if values == 32 else 0.05)).astype(np.float16)
        m[5::23] = np.float16(-2e-6)
        blocks[:, OFFSET_AT[ggml_type]:OFFSET_AT[ggml_type] + 2] = m.view(np.uint8).reshape(n, 2)
    return torch.from_numpy(blocks.reshape(rows, -1))
