"""Gemma 2/3 on CPU attend through the C++ kernels (paged_decode_attention.h,
paged_prefill_attention.h), each sliding layer with its window and Gemma 2's layers with their
soft cap, and still match transformers' logits (test_gemma.py's checks, which run on the
selector's choice of backends, watched here)."""

import inspect

import pytest
from test_gemma import PROMPTS, WINDOW, gemma_pair  # noqa: F401 (a fixture)
from test_models import PagedDriver, check_chunked_prefill, check_prefill_then_decode

from aphrodite.executor.layers.attention import cpu


@pytest.fixture
def kernel_calls(cpp_compiler, monkeypatch):
    """(kernel, window, softcap) of every call the layers make to the C++ attention."""
    assert cpu.kernels_built()
    calls = []
    for name in ("decode", "prefill"):
        real = getattr(cpu, name)
        signature = inspect.signature(real)

        def spy(*args, _real=real, _name=name, _signature=signature, **kwargs):
            bound = _signature.bind(*args, **kwargs)
            bound.apply_defaults()
            calls.append((_name, bound.arguments["window"], bound.arguments["softcap"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu, name, spy)
    return calls


def test_gemma_attends_through_the_cpp_kernels(gemma_pair, kernel_calls):  # noqa: F811
    hf, ours = gemma_pair
    check_prefill_then_decode(hf, PagedDriver(ours), PROMPTS, decode_steps=WINDOW + 2)
    check_chunked_prefill(hf, PagedDriver(ours, seed=1), PROMPTS["b"], PROMPTS["c"], (6, 15))
    softcap = getattr(hf.config, "attn_logit_softcapping", None)
    layers = [layer.self_attn.window for layer in ours.layers]
    assert WINDOW in layers and None in layers     # sliding and global layers
    for kernel in ("decode", "prefill"):
        seen = {(window, cap) for name, window, cap in kernel_calls if name == kernel}
        assert seen == {(window, softcap) for window in layers}, kernel
