"""The C++ elementwise layer steps (kernels/layer_ops.h) against the torch code they replace,
and the layers that call them (layers/norm.py, rotary.py, activation.py).

Sizes cover the vector loops' scalar tails (not multiples of 8 or 16) and rows enough to
split over threads. The whole model on these steps is checked against transformers in
test_models.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.attention import (AttentionConfig, AttentionMetadata,
                                                 allocate_kv_caches)
from aphrodite.executor.layers.activation import silu_and_mul
from aphrodite.executor.layers.norm import add_rms_norm
from aphrodite.executor.layers.rotary import RotaryEmbedding, rotate_and_cache
from aphrodite.model_files import RopeSettings

# rows, size: one decode row, a decode batch, a prefill chunk (split over threads), odd sizes
SHAPES = [(1, 576), (35, 576), (700, 576), (3, 13), (5, 100)]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "no-add"])
@pytest.mark.parametrize("rows,size", SHAPES)
def test_add_rms_norm(rows, size, with_delta, threads, cpp_compiler):
    torch.manual_seed(rows * size)
    x = torch.randn(rows, size) * 3
    delta = torch.randn(rows, size) if with_delta else None
    weight = 1 + 0.2 * torch.randn(size)
    expected_x = x + delta if with_delta else x.clone()
    expected = F.rms_norm(expected_x, (size,), weight, 1e-5)
    out = cpu_kernels.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(x, expected_x)       # the residual stream, updated in place
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (35, 1536), (300, 1536), (3, 21)])
def test_silu_and_mul(rows, inter, threads, cpp_compiler):
    torch.manual_seed(inter)
    gate_up = torch.randn(rows, 2 * inter) * 4
    gate_up[0, :4] = torch.tensor([-100.0, -89.0, 88.5, 100.0])   # past exp's clamps
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = cpu_kernels.silu_and_mul(gate_up)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("head_dim", [64, 16, 12])
def test_rotate_and_cache_matches_rotary_and_write_kv(head_dim, kernel, cache_dtype, threads,
                                                      cpp_compiler, monkeypatch):
    """Rotated q and k as RotaryEmbedding.apply gives them, k and v in their slots (a float16
    cache: rounded as torch rounds them), and no write for slot -1: with the kernel, and on
    the torch path that runs without it."""
    if not kernel:
        monkeypatch.setattr(cpu_kernels, "library_available", lambda: False)
    heads, kv_heads, block_size, num_blocks = 6, 2, 4, 80
    rotary = RotaryEmbedding(head_dim, 256, RopeSettings(10000.0, "default", {}), torch.float32)
    query_lens, seq_lens = np.array([1, 90, 1]), np.array([7, 90, 12])
    tables = np.random.default_rng(0).permutation(num_blocks)[:3 * 23].reshape(3, 23)
    positions, slots = [], []
    for row, (new, total) in enumerate(zip(query_lens, seq_lens)):
        for pos in range(total - new, total):
            positions.append(pos)
            slots.append(tables[row, pos // block_size] * block_size + pos % block_size)
    slots[50] = -1                                    # a token whose slot is not written
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, np.array(slots),
                                   AttentionConfig("cpu", torch.float32, cache_dtype, heads,
                                                   kv_heads, head_dim, block_size))
    cos_sin = rotary.lookup(torch.tensor(positions))
    torch.manual_seed(head_dim)
    qkv = torch.randn(len(slots), heads + 2 * kv_heads, head_dim)

    expected_qk = RotaryEmbedding.apply(qkv[:, :heads + kv_heads], cos_sin)
    cache = allocate_kv_caches(1, num_blocks, block_size, kv_heads, head_dim, cache_dtype,
                               "cpu")[0]
    q, k, v = rotate_and_cache(qkv.clone(), heads, kv_heads, cos_sin, cache, meta)
    torch.testing.assert_close(q, expected_qk[:, :heads], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, expected_qk[:, heads:], rtol=1e-6, atol=1e-6)
    assert torch.equal(v, qkv[:, heads + kv_heads:])
    flat_k = cache[0].view(-1, kv_heads, head_dim)
    flat_v = cache[1].view(-1, kv_heads, head_dim)
    written = [i for i, slot in enumerate(slots) if slot >= 0]
    assert torch.equal(flat_k[[slots[i] for i in written]], k[written].to(cache_dtype))
    assert torch.equal(flat_v[[slots[i] for i in written]], v[written].to(cache_dtype))
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[[slots[i] for i in written]] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_torch_path_without_the_kernels(monkeypatch):
    """Without a compiler the same calls run torch's operators, with the same results."""
    monkeypatch.setattr(cpu_kernels, "library_available", lambda: False)
    torch.manual_seed(0)
    x, delta, weight = torch.randn(5, 40), torch.randn(5, 40), torch.rand(40) + 0.5
    residual = x + delta
    out = add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(x, residual)
    assert torch.equal(out, F.rms_norm(residual, (40,), weight, 1e-6))
    gate_up = torch.randn(5, 2 * 24)
    assert torch.equal(silu_and_mul(gate_up),
                       F.silu(gate_up[:, :24]) * gate_up[:, 24:])
