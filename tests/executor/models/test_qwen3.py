"""Qwen3 (models/qwen3.py) vs HF transformers on tiny random models: float32 logits over a
batched prefill, paged decode steps with shuffled blocks and a chunked prefill (test_models.py's
PagedDriver, atol = rtol = 1e-4), with head_dim apart from hidden / heads, tied and untied
embeddings and q/k/v biases; bfloat16 near transformers' bfloat16; tensor parallel against one
rank; a GGUF file (llama.cpp's names, Q/K rows not permuted) against the same weights from
safetensors; a quantised GGUF model, whose decode steps take the fused C++ step (QK-norm
included), against transformers on the same file; greedy tokens through the whole engine
against transformers' generate."""

import gguf
import pytest
import torch
from gguf_files import write_gguf
from test_models import (ATOL, LONG_PROMPT, PROMPTS, RTOL, SMALL, PagedDriver, _tp_worker,
                         check_chunked_prefill, check_decode_steps, check_engine_greedy,
                         check_prefill_then_decode,
                         hf_logits, load_ours, save_random_model, save_word_tokenizer)
from transformers import AutoModelForCausalLM, Qwen3Config

from aphrodite.config import EngineConfig
from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.quantized import QuantizedWeight
from aphrodite.executor.loader import load_model_weights
from aphrodite.executor.models import fused_decode, get_model_class
from aphrodite.executor.models.qwen3 import Qwen3ForCausalLM
from aphrodite.model_files import load_config, max_model_len, resolve_model

VARIANTS = {
    # head_dim 32 (hidden / heads is 16), untied
    "qwen3-head-dim-untied": lambda: Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False),
    "qwen3-tied": lambda: Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True),
    "qwen3-bias-mha": lambda: Qwen3Config(**{**SMALL, "num_key_value_heads": 4}, head_dim=24,
                                          attention_bias=True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def qwen3_pair(request, tmp_path_factory):
    folder = save_random_model(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, load_ours(folder)


def test_prefill_then_batched_decode(qwen3_pair):
    hf, ours = qwen3_pair
    assert isinstance(ours, Qwen3ForCausalLM)
    check_prefill_then_decode(hf, PagedDriver(ours), PROMPTS, decode_steps=4)


def test_chunked_prefill(qwen3_pair):
    hf, ours = qwen3_pair
    check_chunked_prefill(hf, PagedDriver(ours, seed=1), LONG_PROMPT, PROMPTS["b"], (6, 15))


def test_bfloat16_runs_close_to_transformers_bfloat16(tmp_path):
    """The norms' torch path (the C++ one is float32 only)."""
    folder = save_random_model(VARIANTS["qwen3-head-dim-untied"](), tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    out = PagedDriver(load_ours(folder, dtype=torch.bfloat16)).step(PROMPTS)
    for name, tokens in PROMPTS.items():
        torch.testing.assert_close(out[name], hf_logits(hf, tokens), atol=0.15, rtol=0.05)


def test_registry_and_limits():
    assert get_model_class(Qwen3Config(architectures=["Qwen3ForCausalLM"])) is Qwen3ForCausalLM
    assert get_model_class(Qwen3Config()) is Qwen3ForCausalLM      # GGUF-style: model_type only
    # a window only when the config turns it on; then the length is capped at it
    assert max_model_len(Qwen3Config(**SMALL, sliding_window=64)) == 256
    assert max_model_len(Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=64)) == 64


def test_missing_qk_norm_is_an_error(tmp_path):
    folder = save_random_model(VARIANTS["qwen3-tied"](), tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    weights = [(n, t) for n, t in hf.state_dict().items() if "layers.1.self_attn.k_norm" not in n]
    with pytest.raises(ValueError, match="missing"):
        Qwen3ForCausalLM(hf.config, torch.float32).load_weights(weights)


# ---------------------------------------------------------------------------------------------
# Tensor parallel: two gloo ranks on CPU (test_models.py's worker) give the single-rank logits


@pytest.mark.slow   # two spawned processes: 7 to 16 s on 2 shared cores
def test_tensor_parallel_matches_single_rank(tmp_path):
    folder = save_random_model(VARIANTS["qwen3-head-dim-untied"](), tmp_path / "model")
    result_file = str(tmp_path / "tp_result.pt")
    torch.multiprocessing.spawn(_tp_worker, args=(folder, str(tmp_path / "init"), result_file),
                                nprocs=2)
    tp = torch.load(result_file)
    driver = PagedDriver(load_ours(folder))
    single = {"prefill": driver.step(PROMPTS), "decode": driver.step({n: [7] for n in PROMPTS})}
    for stage in ("prefill", "decode"):
        for name in PROMPTS:
            torch.testing.assert_close(tp[stage][name], single[stage][name], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# GGUF: llama.cpp's Qwen3 conversion (names only; Q/K rows stay in HF order)

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# transformers' GGUF config for qwen3 takes no head_dim from the file (Qwen3Config's default,
# 128, is what real Qwen3 models have), so the GGUF models here have that head_dim.
GGUF_CONFIG = dict(SMALL, head_dim=128, tie_word_embeddings=False)


def write_qwen3_gguf(hf_model, path, quant=gguf.GGMLQuantizationType.F32) -> str:
    config = hf_model.config

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])

    return write_gguf(path, "qwen3", hf_model, GGUF_NAMES, quant, metadata=metadata)


def test_gguf_matches_safetensors_and_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    folder = save_random_model(Qwen3Config(**GGUF_CONFIG), tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_ours(write_qwen3_gguf(hf, tmp_path / "tiny.gguf"))
    assert isinstance(ours, Qwen3ForCausalLM) and ours.head_dim == 128
    out = PagedDriver(ours).step(PROMPTS)
    for name, tokens in PROMPTS.items():
        torch.testing.assert_close(out[name], hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


@pytest.fixture
def fused_steps(monkeypatch) -> list[int]:
    """One entry per decode step that ran fused (a call of cpu_kernels.decode_layers)."""
    steps = []
    decode_layers = cpu_kernels.decode_layers

    def counted(layers, step):
        steps.append(step.tokens)
        return decode_layers(layers, step)
    monkeypatch.setattr(cpu_kernels, "decode_layers", counted)
    return steps


@torch.inference_mode()
def test_quantised_gguf_takes_the_fused_decode_step(tmp_path, monkeypatch, cpp_compiler,
                                                    fused_steps):
    """A Q8_0 GGUF's decode steps run fused (QK-norm in the C++ step) and match transformers'
    reading of the same file."""
    assert cpu_kernels.library_available()   # built under the usual cache folder, not tmp_path's
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    folder = save_random_model(Qwen3Config(**GGUF_CONFIG), tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    path = write_qwen3_gguf(hf, tmp_path / "tiny-q8.gguf", quant=gguf.GGMLQuantizationType.Q8_0)
    files = resolve_model(path)
    ours = Qwen3ForCausalLM(load_config(files), torch.float32)
    load_model_weights(ours, files, EngineConfig(quantization="int4"), "cpu", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny-q8.gguf",
                                                     dtype=torch.float32).eval()
    # Every matrix holds GGUF blocks: the decode steps run fused.
    assert isinstance(ours.layers[1].self_attn.qkv_proj.weight, QuantizedWeight)
    assert fused_decode.layer_weights(ours.layers) is not None
    check_decode_steps(reference, PagedDriver(ours), PROMPTS, steps=3)
    assert fused_steps == [len(PROMPTS)] * 3


# ---------------------------------------------------------------------------------------------
# The whole engine


def test_greedy_through_the_engine_matches_generate(tmp_path):
    config = Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True, eos_token_id=None,
                         bos_token_id=None, pad_token_id=None)
    folder = save_random_model(config, tmp_path)
    save_word_tokenizer(folder, config.vocab_size)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    check_engine_greedy(folder, hf, [PROMPTS["b"], PROMPTS["c"]])
