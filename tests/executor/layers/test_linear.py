"""The CPU kernel choices of cpu_linear give F.linear's results (float64 references)."""

import pytest
import torch
import torch.nn.functional as F

from aphrodite.executor.layers import linear as cpu_linear

torch.set_num_threads(1)


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_float32_weight_matches_float64_reference(tokens, with_bias):
    torch.manual_seed(tokens)
    weight, x = torch.randn(200, 96), torch.randn(tokens, 96)
    bias = torch.randn(200) if with_bias else None
    packed = cpu_linear.pack_weight(weight)
    assert packed.is_mkldnn
    out = cpu_linear.linear(x, packed, bias)
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == torch.float32 and out.shape == (tokens, 200)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 7, 8, 33])
def test_bfloat16_upcast_in_slices_matches_bfloat16_linear(monkeypatch, tokens):
    # Force the upcast path (on CPUs with native bf16 it is off) and slices of 3 rows.
    monkeypatch.setattr(cpu_linear, "bf16_gemm_is_emulated", lambda: True)
    monkeypatch.setattr(cpu_linear, "UPCAST_SLICE_BYTES", 3 * 4 * 64)
    torch.manual_seed(tokens)
    weight = torch.randn(50, 64).to(torch.bfloat16)
    bias = torch.randn(50).to(torch.bfloat16)
    x = torch.randn(tokens, 64).to(torch.bfloat16)
    out = cpu_linear.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, 50)
    # Products of bf16 values are exact in float64, so this is the exact sum, rounded once.
    exact = F.linear(x.double(), weight.double(), bias.double()).to(torch.bfloat16)
    torch.testing.assert_close(out, exact, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1.6e-2, atol=1e-2)
