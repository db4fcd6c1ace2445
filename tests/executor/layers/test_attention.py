"""paged_attention against a dense per-sequence reference on random tensors."""

import math
import mmap
import sys
import types

import numpy as np
import pytest
import torch

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.attention import (
    AttentionConfig,
    AttentionMetadata,
    allocate_kv_caches,
    kv_cache_bytes_per_block,
    paged_attention,
    populate_host_pool,
    write_kv,
)
from aphrodite.executor.layers.attention import metadata, triton
from aphrodite.executor.layers.attention.metadata import plan_decode_groups
from aphrodite.executor.layers.attention.selector import select_backends

torch.set_num_threads(1)

BLOCK_SIZE = 4
NUM_BLOCKS = 80


def dense_reference(q, keys, values, prefix, scale):
    """q [L, H, D] at positions prefix.. prefix+L-1 over keys/values [N, KVH, D] (N = prefix + L)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).float()
    v = values.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("lhd,nhd->hln", q.float(), k) * scale
    query_pos = torch.arange(q.shape[0])[:, None] + prefix
    visible = torch.arange(keys.shape[0])[None, :] <= query_pos
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hln,nhd->lhd", scores.softmax(-1), v)


def make_batch(spec, heads, kv_heads, head_dim, dtype, seed=0, unwritten=(), cache_dtype=None,
               decode=None, prefill=None):
    """spec: list of (cached prefix length, new tokens). Returns everything paged_attention needs
    plus each sequence's full keys/values for the reference. Sequences listed in `unwritten`
    get slot -1 for their new tokens. decode/prefill: backends to use instead of the selector's
    choice (AttentionConfig.decode/.prefill). cache_dtype (default dtype): the cache's; keys
    and values are drawn representable in it, so the reference sees what the cache holds."""
    cache_dtype = cache_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    free_blocks = list(rng.permutation(NUM_BLOCKS))  # shuffled: tables are non-contiguous
    cache = allocate_kv_caches(1, NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim, cache_dtype,
                               "cpu")[0]
    max_blocks = max(math.ceil((p + n) / BLOCK_SIZE) for p, n in spec)
    tables = np.zeros((len(spec), max_blocks), dtype=np.int32)
    qs, ks, vs, slots, full = [], [], [], [], []
    for row, (prefix, new) in enumerate(spec):
        total = prefix + new
        blocks = [free_blocks.pop() for _ in range(math.ceil(total / BLOCK_SIZE))]
        tables[row, : len(blocks)] = blocks
        pos = np.arange(total)
        seq_slots = np.array(blocks)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        keys = torch.randn(total, kv_heads, head_dim, generator=gen).to(cache_dtype).to(dtype)
        values = torch.randn(total, kv_heads, head_dim, generator=gen).to(cache_dtype).to(dtype)
        flat_k = cache[0].view(-1, kv_heads, head_dim)
        flat_v = cache[1].view(-1, kv_heads, head_dim)
        flat_k[torch.from_numpy(seq_slots[:prefix])] = keys[:prefix].to(cache_dtype)   # cached
        flat_v[torch.from_numpy(seq_slots[:prefix])] = values[:prefix].to(cache_dtype)
        qs.append(torch.randn(new, heads, head_dim, generator=gen).to(dtype))
        ks.append(keys[prefix:])
        vs.append(values[prefix:])
        slots.append(np.full(new, -1) if row in unwritten else seq_slots[prefix:])
        full.append((keys, values, seq_slots))
    query_lens = np.array([n for _, n in spec])
    seq_lens = np.array([p + n for p, n in spec])
    config = AttentionConfig.for_cache(cache, heads, dtype, decode=decode, prefill=prefill)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, np.concatenate(slots), config)
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, meta, full


MIXED = [(8, 1), (0, 5), (7, 4), (0, 1), (13, 1), (4, 9)]   # decodes, fresh prefill, chunks on a prefix
DECODES = [(8, 1), (0, 1), (13, 1), (21, 1), (3, 1)]


# Many decodes of spread-out lengths: with small groups they split into several length groups.
MANY_DECODES = [(p, 1) for p in (30, 2, 17, 9, 41, 0, 25, 12, 5, 33, 20, 7)]
# (decode backend, group_tokens, C++ kernels built). "static": the padded gather that CUDA
# graphs replay, forced with the torch prefill; "kernel" and "grouped": the selector's choice
# with and without the C++ kernels. group_tokens for the grouped path: None = the default (one
# group here), 24 = several groups.
PATHS = {"static": ("torch_padded", None, False), "kernel": ("cpu", None, True),
         "grouped": ("torch_grouped", None, False), "grouped-small": ("torch_grouped", 24, False)}


@pytest.mark.parametrize("spec", [MIXED, DECODES, MANY_DECODES, [(5, 6)]],
                         ids=["mixed", "all-decode", "many-decodes", "one-chunk"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype,cache_dtype,tol", [
    (torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 2e-2),
    (torch.float32, torch.float16, 1e-5)], ids=["fp32", "bf16", "fp32-fp16-cache"])
@pytest.mark.parametrize("path", list(PATHS))
def test_matches_dense_reference(spec, heads, kv_heads, dtype, cache_dtype, tol, path,
                                 monkeypatch, request):
    decode, group_tokens, kernel = PATHS[path]
    if kernel:
        request.getfixturevalue("cpp_compiler")
    else:
        monkeypatch.setattr(cpu_kernels, "library_available", lambda: False)
    if group_tokens:
        monkeypatch.setattr(metadata, "DECODE_GROUP_TOKENS", group_tokens)
    head_dim = 16
    scale = head_dim ** -0.5
    forced = {"decode": "torch_padded", "prefill": "torch"} if path == "static" else {}
    q, k, v, cache, meta, full = make_batch(spec, heads, kv_heads, head_dim, dtype,
                                            cache_dtype=cache_dtype, **forced)
    assert meta.num_decode_only == all(n == 1 for _, n in spec)
    has_decodes = any(n == 1 for _, n in spec)
    has_prefills = any(n > 1 for _, n in spec)
    assert meta.decode_backend == (decode if has_decodes else None)
    assert (meta.decode_plan is not None) == (meta.decode_backend == "torch_grouped")
    prefill_kernel = kernel and dtype == torch.float32 and (
        cache_dtype == torch.float32 or cpu_kernels.float16_cache_supported())
    assert meta.prefill_backend == (("cpu" if prefill_kernel else "torch") if has_prefills
                                    else None)
    assert (meta.prefill_seqs is not None) == (meta.prefill_backend == "cpu")
    write_kv(k, v, cache, meta)
    out = paged_attention(q, k, v, cache, meta, scale)
    assert out.shape == q.shape and out.dtype == dtype
    start = 0
    for (prefix, new), (keys, values, seq_slots) in zip(spec, full):
        ref = dense_reference(q[start:start + new], keys, values, prefix, scale)
        torch.testing.assert_close(out[start:start + new].float(), ref, atol=tol, rtol=tol)
        # the new tokens' keys/values landed in their slots
        written = torch.from_numpy(seq_slots)
        assert torch.equal(cache[0].view(-1, kv_heads, head_dim)[written].to(dtype), keys)
        assert torch.equal(cache[1].view(-1, kv_heads, head_dim)[written].to(dtype), values)
        start += new


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("spec", [[(37, 1)], [(2, 1)], [(37, 1), (9, 1)], MANY_DECODES],
                         ids=["one-sequence", "one-short", "two", "many"])
def test_decode_kernel_threads(spec, threads, cache_dtype, cpp_compiler):
    """The kernel splits many sequences by sequence, and a few by kv head and then into runs
    of blocks of the context (merged afterwards; a short context leaves some runs empty);
    all agree with the reference whatever the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, cache, meta, full = make_batch(spec, 12, 3, 64, torch.float32, seed=3,
                                                cache_dtype=cache_dtype)
        assert meta.decode_backend == "cpu"
        write_kv(k, v, cache, meta)
        out = paged_attention(q, k, v, cache, meta, 0.125)
    finally:
        torch.set_num_threads(previous)
    for row, (prefix, _) in enumerate(spec):
        keys, values, _ = full[row]
        ref = dense_reference(q[row:row + 1], keys, values, prefix, 0.125)
        torch.testing.assert_close(out[row:row + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim",
                         [(9, 3, 64), (12, 3, 64), (4, 2, 128), (6, 1, 64), (8, 8, 32)],
                         ids=["group3-64", "group4-64", "group2-128", "group6-64", "mha-32"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_kernel_head_shapes(block_size, heads, kv_heads, head_dim, cache_dtype,
                                   cpp_compiler):
    """With AVX-512 the kernel works sixteen lanes at a time for head_dim 64 (up to four query
    heads per kv head) and 128 (up to two), sixteen keys' scores at once; other shapes take
    the eight-lane form. Contexts of whole, partial and several blocks agree with the
    reference either way."""
    lens = [1, 15, 16, 17, 40, 100]
    per_seq = math.ceil(max(lens) / block_size)
    gen = torch.Generator().manual_seed(11)
    cache = torch.randn(2, len(lens) * per_seq + 3, block_size, kv_heads, head_dim,
                        generator=gen).to(cache_dtype)
    order = torch.randperm(cache.shape[1], generator=gen)[:len(lens) * per_seq]
    tables = order.reshape(len(lens), per_seq).long()
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    scale = head_dim ** -0.5
    out = cpu_kernels.paged_decode_attention(q, cache, tables, torch.tensor(lens), scale)
    for row, n in enumerate(lens):
        keys = cache[0][tables[row]].reshape(-1, kv_heads, head_dim)[:n].float()
        values = cache[1][tables[row]].reshape(-1, kv_heads, head_dim)[:n].float()
        ref = dense_reference(q[row:row + 1], keys, values, n - 1, scale)
        torch.testing.assert_close(out[row:row + 1], ref, atol=1e-5, rtol=1e-5)


# Chunks long enough for several tiles per sequence and many blocks, fresh and on a prefix.
LONG_PREFILLS = [(0, 70), (37, 50), (5, 1), (90, 33), (0, 17)]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 24), (14, 2, 16)],
                         ids=["gqa3-64", "mha-24", "gqa7-16"])
def test_prefill_kernel_long_chunks(heads, kv_heads, head_dim, threads, cache_dtype,
                                    cpp_compiler):
    """The C++ prefill kernel over chunks that span several tiles (48 query rows) and blocks:
    query heads per kv head that divide a tile (3), fill it with one token (1) or leave
    padding rows (7); head sizes with and without a 32-float remainder; float32 and float16
    caches."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, cache, meta, full = make_batch(LONG_PREFILLS, heads, kv_heads, head_dim,
                                                torch.float32, seed=5,
                                                cache_dtype=cache_dtype)
        assert meta.prefill_backend == "cpu" and cpu_kernels.supports_prefill(q, cache)
        write_kv(k, v, cache, meta)
        scale = head_dim ** -0.5
        out = paged_attention(q, k, v, cache, meta, scale)
    finally:
        torch.set_num_threads(previous)
    start = 0
    for (prefix, new), (keys, values, _) in zip(LONG_PREFILLS, full):
        ref = dense_reference(q[start:start + new], keys, values, prefix, scale)
        torch.testing.assert_close(out[start:start + new], ref, atol=1e-5, rtol=1e-5)
        start += new


def test_decode_plan_groups_by_length():
    seq_lens = np.array([30, 3, 17, 9, 41, 1, 25])
    tables = np.arange(7 * 11).reshape(7, 11)            # row r owns blocks 11r .. 11r + 10
    plan = plan_decode_groups(seq_lens, tables, block_size=4, device="cpu", group_tokens=60)
    order = plan.order.tolist()
    assert order == np.argsort(seq_lens, kind="stable").tolist()
    sorted_lens = seq_lens[order]
    assert plan.groups[0].start == 0 and plan.groups[-1].end == len(seq_lens)
    for group, following in zip(plan.groups, plan.groups[1:]):
        assert group.end == following.start
    for group in plan.groups:
        members = np.array(order[group.start:group.end])
        longest = int(sorted_lens[group.end - 1])
        # padded size within budget unless the group is one sequence
        assert group.end - group.start == 1 or (group.end - group.start) * longest <= 60
        assert group.num_blocks == -(-longest // 4)
        assert group.block_ids.tolist() == tables[members, :group.num_blocks].reshape(-1).tolist()
        assert torch.equal(group.visible[:, 0, 0].sum(-1), torch.from_numpy(seq_lens[members]))
    assert len(plan.groups) > 2
    # already sorted rows need no reordering
    assert plan_decode_groups(np.array([2, 5, 9]), tables[:3], 4, "cpu").order is None


def test_slot_minus_one_is_not_written():
    spec = [(4, 1), (0, 3), (6, 1)]
    q, k, v, cache, meta, full = make_batch(spec, 4, 2, 8, torch.float32, unwritten={1})
    before = cache.clone()
    write_kv(k, v, cache, meta)
    changed = (cache != before).flatten(3).any(-1).any(0).flatten()   # per flat slot
    expected = torch.zeros_like(changed)
    for row in (0, 2):
        prefix, new = spec[row]
        expected[torch.from_numpy(full[row][2][prefix:])] = True
    assert torch.equal(changed, expected)


def test_metadata_build():
    config = AttentionConfig("cpu", torch.float32, torch.float32, 4, 2, 8, block_size=4)
    meta = AttentionMetadata.build(np.array([1, 4, 1]), np.array([9, 4, 2]),
                                   np.array([[3, 5, 7], [1, 0, 0], [2, 0, 0]]),
                                   np.array([27, 4, 5, 6, 7, 9]), config)
    assert meta.query_start_loc.tolist() == [0, 1, 5, 6]
    assert meta.seq_lens.tolist() == [9, 4, 2]
    assert meta.max_query_len == 4 and meta.max_seq_len == 9 and not meta.num_decode_only
    assert meta.decode_seq_idx.tolist() == [0, 2] and meta.decode_token_idx.tolist() == [0, 5]
    assert [(p.index, p.token_start, p.token_end, p.seq_len) for p in meta.prefills] == [(1, 1, 5, 4)]
    assert meta.slot_mapping.dtype == torch.long and meta.block_tables.dtype == torch.long


# (device, dtype, cache dtype, heads, kv heads, head_dim, C++ kernels built, Triton installed)
# -> (decode backend, prefill backend): selector.py's rules, one case each.
SELECTOR_CASES = {
    "cpu-kernels": (("cpu", "float32", "float32", 9, 3, 64, True, False), ("cpu", "cpu")),
    "cpu-fp16-cache": (("cpu", "float32", "float16", 9, 3, 64, True, False), ("cpu", "cpu")),
    "cpu-bf16": (("cpu", "bfloat16", "bfloat16", 9, 3, 64, True, False), ("cpu", "torch")),
    "cpu-odd-head": (("cpu", "float32", "float32", 4, 2, 12, True, False),
                     ("torch_padded", "torch")),
    "cpu-wide-group": (("cpu", "float32", "float32", 49, 1, 64, True, False), ("cpu", "torch")),
    "cpu-no-kernels": (("cpu", "float32", "float32", 9, 3, 64, False, False),
                       ("torch_grouped", "torch")),
    "cuda-triton": (("cuda", "bfloat16", "bfloat16", 9, 3, 64, False, True),
                    ("triton", "torch")),
    "cuda-odd-head": (("cuda", "bfloat16", "bfloat16", 9, 3, 80, False, True),
                      ("torch_padded", "torch")),
    "cuda-no-triton": (("cuda", "float32", "float32", 9, 3, 64, False, False),
                       ("torch_padded", "torch")),
}


@pytest.mark.parametrize("case", list(SELECTOR_CASES))
def test_selector_rules(case, monkeypatch):
    (device, dtype, cache_dtype, heads, kv_heads, head_dim, built, has_triton), expected = \
        SELECTOR_CASES[case]
    if built:
        if not cpu_kernels.library_available():
            pytest.skip("the C++ kernels do not build here")
        if cache_dtype == "float16" and not cpu_kernels.float16_cache_supported():
            pytest.skip("no F16C")
    else:
        monkeypatch.setattr(cpu_kernels, "library_available", lambda: False)
    # Triton installed or not: an empty module, or an import that fails.
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton") if has_triton else None)
    triton.decode_supported.cache_clear()
    config = AttentionConfig(device, getattr(torch, dtype), getattr(torch, cache_dtype), heads,
                             kv_heads, head_dim, block_size=16)
    decode, prefill = expected
    fused = decode == "cpu" and cache_dtype != "bfloat16"
    try:
        assert select_backends(config, np.array([1, 5, 1])) == (decode, prefill, False)
        assert select_backends(config, np.array([7, 2])) == (None, prefill, False)
        assert select_backends(config, np.array([1, 1])) == (decode, None, fused)
    finally:
        triton.decode_supported.cache_clear()
    forced = AttentionConfig(device, getattr(torch, dtype), getattr(torch, cache_dtype), heads,
                             kv_heads, head_dim, 16, decode="torch_padded", prefill="torch")
    assert select_backends(forced, np.array([1, 5])) == ("torch_padded", "torch", False)


def test_forcing_an_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="decode backend 'kernel'"):
        AttentionConfig("cpu", torch.float32, torch.float32, 4, 2, 8, 4, decode="kernel")


@pytest.mark.parametrize("cache_dtype,spec,fused", [
    (torch.float32, DECODES, True), (torch.float16, DECODES, True),
    (torch.bfloat16, DECODES, False), (torch.float32, MIXED, False)],
    ids=["fp32", "fp16", "bf16", "mixed"])
def test_cpu_decode_kernel_flag(cache_dtype, spec, fused, cpp_compiler):
    """cpu_decode_kernel (models/fused_decode.py's step): a decode-only step that the C++
    decode kernel serves, on a cache the kernels also write (not bfloat16)."""
    if cache_dtype == torch.float16 and not cpu_kernels.float16_cache_supported():
        pytest.skip("no F16C")
    dtype = torch.bfloat16 if cache_dtype == torch.bfloat16 else torch.float32
    *_, meta, _ = make_batch(spec, 4, 2, 16, dtype, cache_dtype=cache_dtype)
    assert meta.decode_backend == "cpu"
    assert meta.cpu_decode_kernel == fused


def test_cache_allocation_and_size():
    caches = allocate_kv_caches(3, 10, 4, 2, 8, torch.bfloat16, "cpu")
    assert len(caches) == 3 and caches[0].shape == (2, 10, 4, 2, 8)
    assert not caches[0].any()
    per_block = kv_cache_bytes_per_block(3, 4, 2, 8, torch.bfloat16)
    assert per_block * 10 == sum(c.numel() * c.element_size() for c in caches)


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_host_pool_makes_the_pool_resident():
    """The blocks it reports done are resident (the process's RSS grows by their bytes) and
    still zero; with no time it does nothing."""
    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE

    caches = allocate_kv_caches(2, 600, 16, 2, 64, torch.float32, "cpu")
    total = sum(c.numel() * c.element_size() for c in caches)      # 19.7 MB
    before = resident()
    assert populate_host_pool(caches, 0.0) == 0
    assert resident() - before < total // 10
    done = populate_host_pool(caches, 60.0)
    if done == 0:
        pytest.skip("this kernel predates MADV_POPULATE_WRITE (Linux 5.14)")
    assert done == 600
    assert resident() - before > 0.9 * total
    assert not any(c.any() for c in caches)


def test_kv_cache_dtype_choice():
    """auto: the model's dtype; float16: on CPU under any model dtype, on a GPU only where it
    is the model's (the Triton kernel and CUDA graphs read the model's dtype)."""
    from aphrodite.config import EngineConfig
    from aphrodite.executor.model_runner import pick_kv_cache_dtype
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    half = EngineConfig(kv_cache_dtype="float16")
    assert pick_kv_cache_dtype(EngineConfig(), torch.float32, cpu) == torch.float32
    assert pick_kv_cache_dtype(EngineConfig(), torch.bfloat16, cuda) == torch.bfloat16
    assert pick_kv_cache_dtype(half, torch.float32, cpu) == torch.float16
    assert pick_kv_cache_dtype(half, torch.float16, cuda) == torch.float16
    with pytest.raises(ValueError, match="on a GPU the KV cache takes the model's dtype"):
        pick_kv_cache_dtype(half, torch.bfloat16, cuda)
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or float16"):
        EngineConfig(kv_cache_dtype="fp8")
