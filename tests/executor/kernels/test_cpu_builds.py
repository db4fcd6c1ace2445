"""The kernels' AVX-512 (-march=skylake-avx512), AVX2 (-march=x86-64-v3) and portable
(-march=x86-64) builds against the native one.

The kernels have AVX-512, AVX2/F16C and portable branches, and the server only ever builds
for -march=native. Here the other builds are made too and, where this CPU runs them,
each kernel's results are compared with the native build's on the same inputs: equal up to
float32 rounding order, or bit for bit where every build rounds the same way. Plain x86-64
has no F16C, so it reports no float16 caches and those cases are skipped there.

The builds are loaded side by side: each CDLL keeps its symbols to itself (RTLD_LOCAL), and
the only state they share is quantized_linear.h's per-thread scratch buffers (a GNU unique
symbol), which every build grows and uses the same way.
"""

import platform

import numpy as np
import pytest
import torch
from random_gguf_blocks import TYPES, random_blocks

from aphrodite.executor.kernels.cpu import build
from aphrodite.executor.kernels.cpu import ops as cpu_kernels

# The other builds, and the CPU features their code needs.
# skylake-avx512 is AVX-512 without VNNI, BF16 or AMX: the native build's branches where the
# native CPU has more, and the AVX-512 branches themselves where it has only AVX2.
ARCHES = {"skylake-avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2",
                             "fma", "f16c"},
          "x86-64-v3": {"avx2", "fma", "f16c"}, "x86-64": set()}


def cpu_features() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())


@pytest.fixture(scope="module")
def libraries():
    if platform.machine() != "x86_64" or build.find_compiler() is None:
        pytest.skip("needs an x86-64 CPU and g++")
    if cpu_kernels._library() is None:
        pytest.skip("the native build is not available")
    return {arch: build.load_library(arch) for arch in ARCHES}


class OtherBuild:
    """The build for `arch`, run against the native one."""

    def __init__(self, arch: str, library, monkeypatch):
        self.arch, self.library, self.monkeypatch = arch, library, monkeypatch
        self.float16 = bool(library.kv_float16_supported())

    def run(self, fn):
        """(fn() on the native build, fn() on this one)."""
        expected = fn()
        with self.monkeypatch.context() as patch:
            patch.setattr(cpu_kernels, "_library", lambda: self.library)
            return expected, fn()


@pytest.fixture(params=list(ARCHES))
def other(request, libraries, monkeypatch) -> OtherBuild:
    arch = request.param
    if not ARCHES[arch] <= cpu_features():
        pytest.skip(f"this CPU cannot run {arch} code")
    library = libraries[arch]
    assert library is not None, f"the -march={arch} build failed (see the warning logged)"
    return OtherBuild(arch, library, monkeypatch)


def assert_close(built, native):
    """Equal up to float32 rounding order: sums of a few hundred terms, added in another order,
    within 1e-5 of each result's largest value (tuples compared element by element)."""
    for b, n in zip(built, native) if isinstance(native, tuple) else [(built, native)]:
        torch.testing.assert_close(b, n, rtol=1e-5, atol=1e-5 * n.abs().max().item())


def skip_without_float16(other: OtherBuild, dtype: torch.dtype):
    if dtype == torch.float16 and not other.float16:
        pytest.skip(f"-march={other.arch} has no F16C: float16 caches take the torch paths")


def test_float16_caches_need_f16c(other):
    native, built = other.run(cpu_kernels.float16_cache_supported)
    assert native
    assert built == other.float16 == (other.arch != "x86-64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim",
                         [(9, 3, 64), (8, 4, 128), (12, 2, 64), (4, 4, 40)])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("window,softcap", [(None, None), (37, None), (None, 4.0), (50, 2.0)])
def test_decode_attention(other, dtype, heads, kv_heads, head_dim, batch, window, softcap):
    """Without and with a sliding window (not a multiple of the block size, shorter and
    longer than the contexts) and a soft cap."""
    skip_without_float16(other, dtype)
    g = torch.Generator().manual_seed(batch * heads + head_dim)
    block_size, max_blocks = 16, 8
    cache = torch.randn(2, batch * max_blocks, block_size, kv_heads, head_dim,
                        generator=g).to(dtype)
    tables = torch.randperm(batch * max_blocks, generator=g).reshape(batch, max_blocks)
    seq_lens = torch.randint(1, block_size * max_blocks + 1, (batch,), generator=g)
    seq_lens[0] = block_size * max_blocks                      # a full table
    q = torch.randn(batch, heads, head_dim, generator=g)
    native, built = other.run(lambda: cpu_kernels.paged_decode_attention(
        q, cache, tables, seq_lens, head_dim ** -0.5, window, softcap))
    assert_close(built, native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 1, 32), (2, 2, 128)])
@pytest.mark.parametrize("window,softcap", [(None, None), (37, None), (None, 4.0), (50, 2.0)])
def test_prefill_attention(other, dtype, heads, kv_heads, head_dim, window, softcap):
    """Chunks of 1, 7, 64 and 300 tokens after cached prefixes: single tiles, partial and
    many tiles, the diagonal blocks and the ones every row sees; without and with a sliding
    window and a soft cap."""
    skip_without_float16(other, dtype)
    g = torch.Generator().manual_seed(heads + head_dim)
    block_size, chunks, prefixes = 16, [1, 7, 64, 300], [40, 0, 17, 33]
    max_blocks = max(-(-(p + n) // block_size) for p, n in zip(prefixes, chunks))
    cache = torch.randn(2, len(chunks) * max_blocks, block_size, kv_heads, head_dim,
                        generator=g).to(dtype)
    tables = torch.randperm(len(chunks) * max_blocks, generator=g).reshape(-1, max_blocks)
    starts = np.cumsum([0, *chunks[:-1]])
    seqs = torch.tensor([[row, start, n, p + n] for row, (start, n, p)
                         in enumerate(zip(starts, chunks, prefixes))])
    qkv = torch.randn(sum(chunks), heads + 2 * kv_heads, head_dim, generator=g)
    q = qkv[:, :heads]                                         # rows strided, as in a layer
    assert cpu_kernels.supports_prefill(q, cache)

    def run():
        out = torch.zeros(sum(chunks), heads, head_dim)
        cpu_kernels.paged_prefill_attention(q, cache, tables, seqs, head_dim ** -0.5, out,
                                            window, softcap)
        return out

    native, built = other.run(run)
    assert_close(built, native)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_blocks_bit_for_bit(other, name):
    blocks = random_blocks(TYPES[name], 100, 512, seed=1)
    native, built = other.run(lambda: cpu_kernels.dequantize_blocks(blocks, TYPES[name], 512))
    assert torch.equal(built.view(torch.int32), native.view(torch.int32))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("tokens", [1, 7, 20, 64, 300])
def test_quantized_linear(other, name, tokens):
    """1 and 7 tokens: the row-by-row products; 20, 64 and 300: the panels, with the tiles of
    8, 16 and 32 tokens and a padded last one. 100 rows leave a partial panel and tile."""
    blocks = random_blocks(TYPES[name], 100, 512, seed=tokens)
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens))
    native, built = other.run(lambda: cpu_kernels.quantized_linear(x, blocks, TYPES[name]))
    assert_close(built, native)


@pytest.mark.parametrize("rows,size", [(7, 100), (64, 576)])
def test_add_rms_norm_and_gated_products(other, rows, size):
    """The norm, and the SiLU- and tanh-GELU-gated products (gates up to about +-20, where
    the exponentials saturate)."""
    g = torch.Generator().manual_seed(rows)
    x, delta = torch.randn(rows, size, generator=g), torch.randn(rows, size, generator=g)
    weight = torch.randn(size, generator=g)
    gate_up = torch.randn(rows, 2 * size, generator=g) * 5

    def run():
        summed = x.clone()
        return (cpu_kernels.add_rms_norm(summed, delta, weight, 1e-5), summed,
                cpu_kernels.add_rms_norm(x.clone(), None, weight, 1e-5),
                cpu_kernels.silu_and_mul(gate_up), cpu_kernels.gelu_tanh_and_mul(gate_up))

    native, built = other.run(run)
    assert_close(built, native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [3, 64])
def test_rotate_and_cache(other, dtype, tokens):
    skip_without_float16(other, dtype)
    g = torch.Generator().manual_seed(tokens)
    heads, kv_heads, head_dim = 9, 3, 64
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g)
    cos, sin = (torch.randn(tokens, head_dim, generator=g) for _ in range(2))
    slots = torch.randperm(4 * tokens, generator=g)[:tokens]
    slots[0] = -1                                              # not stored

    def run():
        rotated = qkv.clone()
        cache = torch.zeros(2, 4 * tokens, 1, kv_heads, head_dim, dtype=dtype)
        cpu_kernels.rotate_and_cache(rotated, heads, cos, sin, slots, cache)
        return rotated, cache.float()

    native, built = other.run(run)
    assert_close(built, native)
