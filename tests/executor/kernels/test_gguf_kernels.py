"""The CPU kernels on GGUF blocks of every type they know (kernels/cpu/gguf_blocks.h): Q4_1,
Q5_0, Q8_0, Q4_K, Q5_K and Q6_K.

References are gguf's own: its dequantisation (gguf.quants.dequantize), which the kernels'
must equal bit for bit, and float64 products of that matrix, which the kernels' products
must equal up to float32 rounding order.
"""

import gguf
import numpy as np
import pytest
import torch
from random_gguf_blocks import TYPES, random_blocks

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers import linear
from aphrodite.executor.layers.quantized import (BLOCKS, Q4_K, Q5_0, Q6_K, Q8_0,
                                                 QuantizedParts, QuantizedWeight)

pytestmark = pytest.mark.usefixtures("cpp_compiler")
# 512 columns: two blocks of 256 values, sixteen of 32. 100 rows leave a partial panel.
ROWS, COLS = 100, 512


def gguf_matrix(blocks: torch.Tensor, ggml_type: int, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(blocks.numpy(), ggml_type).reshape(blocks.shape[0], cols)


def assert_product(out: torch.Tensor, x: torch.Tensor, matrix: np.ndarray):
    """out equals x @ matrix^T in float64 up to float32 rounding order: each output within
    1e-5 of its terms' absolute sum (a float32 sum of 512 products, reordered, is off by far
    less; a wrong code, scale or offset by far more)."""
    w = torch.from_numpy(matrix).double()
    error = (out.double() - x.double() @ w.T).abs()
    bound = 1e-5 * (x.double().abs() @ w.abs().T)
    assert bool((error <= bound).all()), f"{(error / bound).max().item() * 1e-5:.2e}"


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_is_ggufs_bit_for_bit(name):
    ggml_type = TYPES[name]
    blocks = random_blocks(ggml_type, ROWS, COLS, seed=1)
    out = cpu_kernels.dequantize_blocks(blocks, ggml_type, COLS).numpy()
    np.testing.assert_array_equal(out.view(np.uint32),
                                  gguf_matrix(blocks, ggml_type, COLS).view(np.uint32))


def test_dequantize_quantised_q5_0_bit_for_bit():
    """Blocks from gguf's own Q5_0 quantiser, not only random bytes."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((64, COLS)) * 0.1).astype(np.float32)
    blocks = torch.from_numpy(gguf.quants.quantize(values, Q5_0))
    out = cpu_kernels.dequantize_blocks(blocks, Q5_0, COLS).numpy()
    np.testing.assert_array_equal(out.view(np.uint32),
                                  gguf_matrix(blocks, Q5_0, COLS).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_quantized_linear_matches_float64_product(name, tokens):
    """1 and 7 tokens: the row-by-row products (tiles of 4 tokens and a partial one); 64 and
    300: the panels, with whole and padded tiles of tokens."""
    ggml_type = TYPES[name]
    blocks = random_blocks(ggml_type, ROWS, COLS, seed=tokens)
    x = torch.randn(tokens, COLS, generator=torch.Generator().manual_seed(tokens))
    out = cpu_kernels.quantized_linear(x, blocks, ggml_type)
    assert out.shape == (tokens, ROWS)
    assert_product(out, x, gguf_matrix(blocks, ggml_type, COLS))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5])
def test_row_products_of_an_odd_number_of_blocks(name, tokens):
    """Rows of 17 blocks of 32 values (3 of 256): the row-by-row products alternate between
    two accumulators by group, so an odd count leaves a last group over; 2, 3 and 5 tokens
    give every token tile (5: a tile of 4 and one of 1)."""
    ggml_type = TYPES[name]
    cols = 17 * 32 if BLOCKS[ggml_type][0] == 32 else 3 * 256
    blocks = random_blocks(ggml_type, 9, cols, seed=tokens)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    assert_product(cpu_kernels.quantized_linear(x, blocks, ggml_type), x,
                   gguf_matrix(blocks, ggml_type, cols))


@pytest.mark.parametrize("name", ["q5_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("tokens", [3, 20])
def test_out_stride_writes_only_its_columns(name, tokens):
    """out: columns 10..10+rows of a wider result; the others stay as they were."""
    ggml_type = TYPES[name]
    blocks = random_blocks(ggml_type, ROWS, COLS, seed=tokens)
    x = torch.randn(tokens, COLS, generator=torch.Generator().manual_seed(tokens))
    wide = torch.full((tokens, ROWS + 30), float("nan"))
    cpu_kernels.quantized_linear(x, blocks, ggml_type, wide[:, 10:10 + ROWS])
    assert torch.equal(wide[:, 10:10 + ROWS], cpu_kernels.quantized_linear(x, blocks, ggml_type))
    assert bool(wide[:, :10].isnan().all() and wide[:, 10 + ROWS:].isnan().all())


def test_columns_not_whole_blocks_are_refused():
    blocks = random_blocks(Q4_K, 4, 256, seed=0)
    with pytest.raises(ValueError):
        cpu_kernels.quantized_linear(torch.randn(1, 288), blocks[:, :162].contiguous(), Q4_K)


@pytest.mark.parametrize("tokens", [1, 64])
def test_stacked_weight_of_mixed_types(tokens):
    """A stacked projection as Q4_K_M files store q/k/v: Q5_0 rows, Q8_0 rows, Q6_K rows and
    Q4_K rows, each run's columns written by its own kernel, through linear.linear."""
    parts = [QuantizedParts(t, random_blocks(t, rows, COLS, seed=i).numpy(), COLS)
             for i, (t, rows) in enumerate([(Q5_0, 24), (Q8_0, 8), (Q6_K, 40), (Q4_K, 16)])]
    weight = QuantizedWeight(parts, gguf_blocks=True)
    assert [t for t, _ in weight.segments] == [Q5_0, Q8_0, Q6_K, Q4_K]
    matrix = np.concatenate([p.dequantize() for p in parts])
    np.testing.assert_array_equal(weight.dequantize().numpy(), matrix)
    x = torch.randn(tokens, COLS, generator=torch.Generator().manual_seed(tokens))
    out = linear.linear(x, weight, None)
    assert out.shape == (tokens, 88)
    assert_product(out, x, matrix)
