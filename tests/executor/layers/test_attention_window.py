"""paged_attention with a sliding window and a soft cap (the torch backends) against a dense
masked reference, and the selector routing such a model to the torch backends."""

import numpy as np
import pytest
import torch
from test_attention import DECODES, MANY_DECODES, MIXED, make_batch

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.attention import (AttentionConfig, AttentionMetadata,
                                                 paged_attention, write_kv)
from aphrodite.executor.layers.attention import metadata
from aphrodite.executor.layers.attention.selector import select_backends

torch.set_num_threads(1)


def windowed_reference(q, keys, values, prefix, scale, window, softcap):
    """Dense attention of q [L, H, D] at positions prefix.. over keys/values [N, KVH, D]: query
    at p sees keys at n <= p and n > p - window; scores soft-capped first."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).double()
    v = values.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("lhd,nhd->hln", q.double(), k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    query_pos = torch.arange(q.shape[0])[:, None] + prefix
    key_pos = torch.arange(keys.shape[0])[None, :]
    visible = (key_pos <= query_pos) & (key_pos > query_pos - window if window else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hln,nhd->lhd", scores.softmax(-1), v).float()


# Prefixes longer than the windows, decodes right at and past them, a fresh prompt longer than
# the window, chunks on a cached prefix.
LONG_MIXED = [(20, 1), (0, 13), (9, 7), (0, 1), (7, 1), (30, 1), (3, 12)]


@pytest.mark.parametrize("spec", [MIXED, DECODES, MANY_DECODES, LONG_MIXED],
                         ids=["mixed", "all-decode", "many-decodes", "long-mixed"])
@pytest.mark.parametrize("window,softcap", [(8, None), (5, None), (None, 2.0), (6, 1.5)],
                         ids=["w8", "w5", "cap", "w6-cap"])
@pytest.mark.parametrize("decode,group_tokens", [("torch_padded", None), ("torch_grouped", None),
                                                 ("torch_grouped", 24)],
                         ids=["padded", "grouped", "grouped-small"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
def test_window_and_softcap_match_dense_reference(spec, window, softcap, decode, group_tokens,
                                                  dtype, tol, monkeypatch):
    if group_tokens:
        monkeypatch.setattr(metadata, "DECODE_GROUP_TOKENS", group_tokens)
    heads, kv_heads, head_dim = 8, 2, 16
    scale = 0.3
    q, k, v, cache, meta, full = make_batch(spec, heads, kv_heads, head_dim, dtype,
                                            decode=decode, prefill="torch")
    write_kv(k, v, cache, meta)
    out = paged_attention(q, k, v, cache, meta, scale, window=window, softcap=softcap)
    start = 0
    for (prefix, new), (keys, values, _) in zip(spec, full):
        ref = windowed_reference(q[start:start + new], keys, values, prefix, scale, window,
                                 softcap)
        torch.testing.assert_close(out[start:start + new].float(), ref, atol=tol, rtol=tol)
        start += new
    # the test can fail: with the window or cap ignored, some row differs
    plain = windowed_reference(q[:spec[0][1]], *full[0][:2], spec[0][0], scale, None, None)
    if spec[0][0] + spec[0][1] > (window or 1 << 30) or softcap:
        assert not torch.allclose(out[:spec[0][1]].float(), plain, atol=tol, rtol=tol)


def test_selector_routes_a_windowed_model_to_torch(cpp_compiler):
    plain = AttentionConfig("cpu", torch.float32, torch.float32, 4, 2, 16, 4)
    assert select_backends(plain, np.array([1, 5])) == ("cpu", "cpu", False)
    for extra in ({"sliding_window": 8}, {"softcap": 50.0}):
        config = AttentionConfig("cpu", torch.float32, torch.float32, 4, 2, 16, 4, **extra)
        assert select_backends(config, np.array([1, 5])) == ("torch_grouped", "torch", False)
        assert select_backends(config, np.array([1, 1])) == ("torch_grouped", None, False)
        cuda = AttentionConfig("cuda", torch.float16, torch.float16, 4, 2, 16, 4, **extra)
        assert select_backends(cuda, np.array([1, 5])) == ("torch_padded", "torch", False)
    with pytest.raises(ValueError, match="torch backends only"):
        AttentionConfig("cpu", torch.float32, torch.float32, 4, 2, 16, 4, decode="cpu",
                        sliding_window=8)


def test_a_window_on_a_kernel_backend_is_an_error(cpp_compiler):
    q, k, v, cache, meta, _ = make_batch([(9, 1), (0, 3)], 4, 2, 16, torch.float32)
    assert meta.decode_backend == "cpu" and cpu_kernels.library_available()
    write_kv(k, v, cache, meta)
    with pytest.raises(ValueError, match="AttentionConfig must name them"):
        paged_attention(q, k, v, cache, meta, 0.25, window=4)
    config = AttentionConfig.for_cache(cache, 4, torch.float32, sliding_window=4)
    assert config.sliding_window == 4 and config.torch_only
    assert AttentionMetadata.build(np.array([1]), np.array([10]), np.zeros((1, 3), np.int32),
                                   np.array([3]), config).decode_backend == "torch_grouped"
