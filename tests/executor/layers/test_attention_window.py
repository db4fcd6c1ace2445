"""paged_attention with a sliding window and a soft cap against a dense masked float64
reference, on every CPU backend: the torch ones (torch_paged.py) and the C++ kernels
(paged_decode_attention.h, paged_prefill_attention.h; test_attention_window_kernels.py tests
them on larger shapes). Which backends a model takes does not depend on its windows:
test_gemma_kernels.py checks that Gemma runs on the C++ kernels."""

import pytest
import torch
from test_attention import DECODES, MANY_DECODES, MIXED, make_batch

from aphrodite.executor.layers.attention import metadata, paged_attention, write_kv

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


# (decode backend, prefill backend, group_tokens, C++ kernels). "kernel": the selector's
# choice with the kernels built, which for float32 models is the C++ decode and prefill kernels
# (asserted below) and for bfloat16 ones C++ decode and torch prefill.
PATHS = {"padded": ("torch_padded", "torch", None, False),
         "grouped": ("torch_grouped", "torch", None, False),
         "grouped-small": ("torch_grouped", "torch", 24, False),
         "kernel": (None, None, None, True)}


@pytest.mark.parametrize("spec", [MIXED, DECODES, MANY_DECODES, LONG_MIXED],
                         ids=["mixed", "all-decode", "many-decodes", "long-mixed"])
@pytest.mark.parametrize("window,softcap", [(8, None), (5, None), (None, 2.0), (6, 1.5)],
                         ids=["w8", "w5", "cap", "w6-cap"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype,cache_dtype,tol", [
    (torch.float32, None, 1e-5), (torch.bfloat16, None, 2e-2),
    (torch.float32, torch.float16, 1e-5)], ids=["fp32", "bf16", "fp32-fp16-cache"])
def test_window_and_softcap_match_dense_reference(spec, window, softcap, path, dtype,
                                                  cache_dtype, tol, monkeypatch, request):
    decode, prefill, group_tokens, kernel = PATHS[path]
    if kernel:
        request.getfixturevalue("cpp_compiler")
    if group_tokens:
        monkeypatch.setattr(metadata, "DECODE_GROUP_TOKENS", group_tokens)
    heads, kv_heads, head_dim = 8, 2, 16
    scale = 0.3
    q, k, v, cache, meta, full = make_batch(spec, heads, kv_heads, head_dim, dtype,
                                            cache_dtype=cache_dtype, decode=decode,
                                            prefill=prefill)
    if kernel:   # the C++ kernels serve the windowed and capped layers
        assert meta.decode_backend in (None, "cpu")
        assert meta.prefill_backend in (None, "cpu" if dtype == torch.float32 else "torch")
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
