"""The C++ decode and prefill kernels (kernels/cpu/ops.py) with a sliding window and a soft cap
against torch_paged.py's functions, which test_attention_window.py checks against a dense
float64 reference: real head shapes (the AVX-512 wide form and the generic one), float32,
bfloat16 and float16 caches, shuffled block tables, windows that are not multiples of the
block size, contexts shorter and longer than the window, several threads (a sequence's context
split into runs, prefill tiles taken in any order); and blocks wholly before the window, filled
with NaN, which the kernels must not read."""

import math

import pytest
import torch

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.attention import torch_paged
from aphrodite.executor.layers.attention.metadata import PrefillSeq

BLOCK = 16


@pytest.fixture(autouse=True)
def kernels(cpp_compiler):
    assert cpu_kernels.library_available()


@pytest.fixture(params=[1, 8], ids=["1-thread", "8-threads"])
def threads(request):
    """8 threads on any CPU: batch 1 then splits each kv head's context into runs."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def paged(lengths, kv_heads, head_dim, dtype, seed):
    """A cache holding len(lengths) sequences in shuffled blocks, and their block tables."""
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(n / BLOCK) for n in lengths]
    cache = torch.randn(2, sum(blocks) + 1, BLOCK, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(sum(blocks) + 1, generator=g)
    tables = torch.zeros(len(lengths), max(blocks), dtype=torch.int64)
    used = 0
    for row, n in enumerate(blocks):
        tables[row, :n] = order[used:used + n]
        used += n
    return cache, tables, g


def poison_before(cache, tables, row, first_visible):
    """NaN into the row's blocks that hold only positions before first_visible."""
    for b in range(first_visible // BLOCK):
        cache[:, tables[row, b]] = float("nan")


DECODE_LENGTHS = [1, 7, 37, 300, 513]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 4, 128), (4, 1, 256),
                                                     (4, 4, 40)])
@pytest.mark.parametrize("window,softcap", [(1, None), (7, None), (16, 0.5), (50, None),
                                            (512, None), (None, 5.0), (37, 2.0)])
@pytest.mark.parametrize("batch", [1, len(DECODE_LENGTHS)])
def test_decode_kernel(dtype, heads, kv_heads, head_dim, window, softcap, batch, threads):
    if dtype == torch.float16 and not cpu_kernels.float16_cache_supported():
        pytest.skip("no F16C: float16 caches take the torch paths")
    lengths = DECODE_LENGTHS[-batch:]
    cache, tables, g = paged(lengths, kv_heads, head_dim, dtype, seed=heads + head_dim)
    seq_lens = torch.tensor(lengths)
    q = torch.randn(batch, heads, head_dim, generator=g)
    scale = head_dim ** -0.5
    want = torch_paged.padded_decode(q, cache, tables, seq_lens, max(lengths), scale, window,
                                     softcap)
    if window:
        for row, n in enumerate(lengths):
            poison_before(cache, tables, row, n - window)
    got = cpu_kernels.paged_decode_attention(q, cache, tables, seq_lens, scale, window, softcap)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    unwindowed = torch_paged.padded_decode(q, cache.nan_to_num(), tables, seq_lens,
                                           max(lengths), scale, None, softcap)
    if window and max(lengths) > window:   # the window mattered: the test can fail
        assert not torch.allclose(got, unwindowed, atol=1e-3, rtol=1e-3)


# (cached prefix, new tokens): a fresh prompt past the window, chunks on cached prefixes past
# it, a single token, chunks of several tiles.
PREFILLS = [(0, 70), (40, 7), (200, 1), (33, 100), (0, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 1, 32), (4, 1, 256)])
@pytest.mark.parametrize("window,softcap", [(1, None), (5, None), (16, 0.5), (20, None),
                                            (64, None), (None, 3.0), (21, 1.5)])
def test_prefill_kernel(dtype, heads, kv_heads, head_dim, window, softcap, threads):
    if dtype == torch.float16 and not cpu_kernels.float16_cache_supported():
        pytest.skip("no F16C: float16 caches take the torch paths")
    lengths = [p + n for p, n in PREFILLS]
    cache, tables, g = paged(lengths, kv_heads, head_dim, dtype, seed=heads + head_dim)
    tokens = sum(n for _, n in PREFILLS)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g)
    q = qkv[:, :heads]                               # rows strided, as in a layer
    starts = [sum(n for _, n in PREFILLS[:i]) for i in range(len(PREFILLS))]
    seqs = torch.tensor([[row, start, n, p + n]
                         for row, (start, (p, n)) in enumerate(zip(starts, PREFILLS))])
    # torch_paged.prefill reads the new tokens' keys and values from k/v, the prefix's from the
    # cache: hand it the cache's copies, widened as the kernel widens them.
    k = torch.empty(tokens, kv_heads, head_dim)
    v = torch.empty(tokens, kv_heads, head_dim)
    for row, (start, (p, n)) in enumerate(zip(starts, PREFILLS)):
        positions = torch.arange(p, p + n)
        slots = tables[row, positions // BLOCK] * BLOCK + positions % BLOCK
        k[start:start + n] = cache[0].view(-1, kv_heads, head_dim)[slots].float()
        v[start:start + n] = cache[1].view(-1, kv_heads, head_dim)[slots].float()
    scale = head_dim ** -0.5
    want = torch.zeros(tokens, heads, head_dim)
    torch_paged.prefill(q.contiguous(), k, v, cache.float(), tables,
                        [PrefillSeq(row, start, start + n, p + n) for row, (start, (p, n))
                         in enumerate(zip(starts, PREFILLS))], scale, want, window, softcap)
    if window:   # blocks before the first new token's window
        for row, (p, _) in enumerate(PREFILLS):
            poison_before(cache, tables, row, p - window + 1)
    got = torch.zeros(tokens, heads, head_dim)
    cpu_kernels.paged_prefill_attention(q, cache, tables, seqs, scale, got, window, softcap)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    if window and window < max(lengths):   # the window mattered: the test can fail
        plain = torch.zeros(tokens, heads, head_dim)
        cpu_kernels.paged_prefill_attention(q, cache.nan_to_num(), tables, seqs, scale, plain,
                                            None, softcap)
        assert not torch.allclose(got, plain, atol=1e-3, rtol=1e-3)
