"""linear.py's kernel choices: which kernel each weight format and token count gets, and the
float ones' results against F.linear's (float64 references). The quantised kernels' results
are checked in test_quantized.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aphrodite.executor.layers import linear
from aphrodite.executor.layers.quantized import QuantizedParts, QuantizedWeight

torch.set_num_threads(1)


@pytest.mark.skipif(not linear.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_float32_weight_matches_float64_reference(tokens, with_bias):
    torch.manual_seed(tokens)
    weight, x = torch.randn(200, 96), torch.randn(tokens, 96)
    bias = torch.randn(200) if with_bias else None
    packed = linear.pack_weight(weight)
    assert packed.is_mkldnn
    out = linear.linear(x, packed, bias)
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == torch.float32 and out.shape == (tokens, 200)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 7, 8, 33])
def test_bfloat16_upcast_in_slices_matches_bfloat16_linear(monkeypatch, tokens):
    # Force the upcast path (on CPUs with native bf16 it is off) and slices of 3 rows.
    monkeypatch.setattr(linear, "bf16_gemm_is_emulated", lambda: True)
    monkeypatch.setattr(linear, "UPCAST_SLICE_BYTES", 3 * 4 * 64)
    torch.manual_seed(tokens)
    weight = torch.randn(50, 64).to(torch.bfloat16)
    bias = torch.randn(50).to(torch.bfloat16)
    x = torch.randn(tokens, 64).to(torch.bfloat16)
    out = linear.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, 50)
    # Products of bf16 values are exact in float64, so this is the exact sum, rounded once.
    exact = F.linear(x.double(), weight.double(), bias.double()).to(torch.bfloat16)
    torch.testing.assert_close(out, exact, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1.6e-2, atol=1e-2)


def _quantized(kind, gguf_blocks):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16 if kind == "int4" else 127, (64, 64)).astype(
        np.uint8 if kind == "int4" else np.int8)
    scales = np.full((64, 2), 0.5, dtype=np.float32)
    mins = np.full((64, 2), -4.0, dtype=np.float32) if kind == "int4" else None
    return QuantizedWeight(QuantizedParts.from_codes(kind, codes, scales, mins),
                           gguf_blocks=gguf_blocks)


@pytest.mark.skipif(not linear.onednn_available(), reason="torch built without oneDNN")
def test_kernel_choice_follows_format_and_token_count(monkeypatch, cpp_compiler):
    """The policy table of linear.py, at each threshold: the kernel each weight format gets."""
    choose = linear.choose_kernel
    packed = linear.pack_weight(torch.randn(8, 16))
    assert choose(packed, 1) is choose(packed, 4096) is linear._onednn
    assert choose(torch.randn(8, 16), 1) is F.linear
    monkeypatch.setattr(linear, "bf16_gemm_is_emulated", lambda: True)
    bf16 = torch.randn(8, 16).to(torch.bfloat16)
    upcast_from = linear.UPCAST_BF16_FROM_TOKENS
    assert choose(bf16, upcast_from - 1) is F.linear
    assert choose(bf16, upcast_from) is linear._bf16_upcast

    dense_above, amx_above = linear.DENSE_ABOVE_TOKENS, linear.AMX_ABOVE_TOKENS
    blocks = _quantized("int4", gguf_blocks=True)
    assert choose(blocks, 1) is choose(blocks, dense_above) is linear._gguf_blocks
    assert choose(blocks, dense_above + 1) is linear._dequantized
    blocks.dense = blocks.dequantize()
    assert choose(blocks, dense_above) is linear._gguf_blocks
    assert choose(blocks, dense_above + 1) is linear._dense_copy
    blocks.dense, blocks.amx = None, torch.empty(0)
    assert choose(blocks, amx_above) is linear._gguf_blocks
    assert choose(blocks, amx_above + 1) is choose(blocks, 4096) is linear._amx

    torch_int4 = _quantized("int4", gguf_blocks=False)
    int4_max = linear.TORCH_INT4_DENSE_ABOVE_TOKENS
    assert choose(torch_int4, int4_max) is linear._torch_int4
    assert choose(torch_int4, int4_max + 1) is linear._dequantized
    with pytest.raises(ValueError, match="only Q4_0/Q4_1"):   # no kernel: loaded dequantised
        _quantized("int8", gguf_blocks=False)


def test_fused_decode_takes_blocks_and_yields_to_a_float32_copy(cpp_compiler):
    weight = _quantized("int8", gguf_blocks=True)
    limit = linear.FUSED_DECODE_MAX_TOKENS
    assert linear.runs_fused_decode(weight, 4096)
    weight.dense = weight.dequantize()
    assert linear.runs_fused_decode(weight, limit)
    assert not linear.runs_fused_decode(weight, limit + 1)
    assert not linear.runs_fused_decode(_quantized("int4", gguf_blocks=False), 1)
    assert not linear.runs_fused_decode(torch.randn(8, 16), 1)
