"""The fused C++ decode step (kernels/decode_layers.h) on the layers beyond Llama's: Gemma 3
(QK-norm, sandwich norms, tanh-GELU, a sliding window shorter than the contexts, local and
global rotary tables), Gemma 2 (attention soft cap) and Qwen3 (QK-norm), tiny random models
with GQA whose projections hold GGUF blocks: all Q8_0, or stacked projections of mixed types
(q/k/v in three, gate/up in two) with K-quant o_proj and down_proj. Each decode step's hidden
states, logits and caches equal the layer-by-layer forward's; and the C++ tanh-GELU product
equals torch's."""

import gguf
import pytest
import torch
import torch.nn.functional as F
from test_fused_decode import check_fused_steps, fused_steps, quantised_model  # noqa: F401
from test_gemma import GGUF_CONFIGS, PROMPTS, write_gemma_gguf
from test_models import PagedDriver, check_decode_steps, save_random_model
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Qwen3Config

from aphrodite.config import EngineConfig

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.quantized import Q4_K, Q6_K
from aphrodite.executor.loader import load_model_weights
from aphrodite.executor.models import fused_decode, gemma
from aphrodite.model_files import load_config, resolve_model

Q = gguf.GGMLQuantizationType
WINDOW = 8     # two cache blocks; the contexts run to 17 tokens
SMALL = dict(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             max_position_embeddings=128, rms_norm_eps=1e-6)
GEMMA = dict(SMALL, sliding_window=WINDOW, query_pre_attn_scalar=24,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"])
VARIANTS = {
    "gemma3": lambda: Gemma3TextConfig(
        **GEMMA, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}),
    "gemma2": lambda: Gemma2Config(**GEMMA, attn_logit_softcapping=3.0,
                                   final_logit_softcapping=5.0),
    "qwen3": lambda: Qwen3Config(**SMALL, tie_word_embeddings=True),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TYPES = {
    "q8_0": dict.fromkeys(PROJECTIONS, Q.Q8_0),
    "mixed": {"q_proj": Q.Q5_0, "k_proj": Q.Q8_0, "v_proj": Q.Q5_0, "o_proj": Q4_K,
              "gate_proj": Q.Q8_0, "up_proj": Q.Q5_0, "down_proj": Q6_K},
}


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("types", list(TYPES))
@pytest.mark.parametrize("family", list(VARIANTS))
@pytest.mark.parametrize("batch", [3, 10])
@torch.inference_mode()
def test_fused_decode_matches_layer_by_layer(family, types, batch, cache_dtype, cpp_compiler,
                                             fused_steps, monkeypatch):  # noqa: F811
    """The layer-by-layer forward with the C++ tanh-GELU product (torch's differs from it
    by float32 rounding, test_gelu_tanh_and_mul_matches_torch), so that the two compute the
    same arithmetic and a float16 cache's roundings do not flip."""
    monkeypatch.setattr(gemma, "gelu_tanh_and_mul", cpu_kernels.gelu_tanh_and_mul)
    model = quantised_model(VARIANTS[family](), TYPES[types], random_types=(Q4_K, Q6_K))
    layer = model.layers[0]
    qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    assert (len(qkv.segments), len(gate_up.segments)) == ((3, 2) if types == "mixed" else (1, 1))
    assert (getattr(layer.self_attn, "q_norm", None) is None) == (family == "gemma2")
    check_fused_steps(model, batch, cache_dtype, fused_steps)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
@torch.inference_mode()
def test_fused_decode_matches_torch_gelu_layer_by_layer(family, cpp_compiler,
                                                        fused_steps):  # noqa: F811
    """Against the layer-by-layer forward as it runs (torch's tanh-GELU): its float32
    rounding differences, carried through three layers of random K-quant weights, stay
    within 1e-4."""
    model = quantised_model(VARIANTS[family](), TYPES["mixed"], random_types=(Q4_K, Q6_K))
    check_fused_steps(model, 3, torch.float32, fused_steps, atol=1e-4)


def test_gemma_layers_wire_their_own_pieces(cpp_compiler):
    """Gemma 3's local layers rotate by the local tables and have the window; the sandwich
    norms and QK-norm are all passed."""
    model = quantised_model(VARIANTS["gemma3"]())
    weights = fused_decode.layer_weights(model.layers)
    assert [w.window for w in weights] == [WINDOW, 0, WINDOW]
    assert [w.local_rope for w in weights] == [1, 0, 1]
    layer = model.layers[1]
    assert weights[1].post_norm == layer.pre_feedforward_layernorm.weight.data_ptr()
    assert weights[1].attn_out_norm == layer.post_attention_layernorm.weight.data_ptr()
    assert weights[1].mlp_out_norm == layer.post_feedforward_layernorm.weight.data_ptr()
    assert weights[1].q_norm == layer.self_attn.q_norm.weight.data_ptr()
    assert model.fused_decode.gelu


@pytest.mark.parametrize("arch", list(GGUF_CONFIGS))
@torch.inference_mode()
def test_q8_0_gguf_decodes_fused_like_transformers(arch, tmp_path, monkeypatch, cpp_compiler,
                                                   fused_steps):  # noqa: F811
    """A Q8_0 GGUF file through the loader: its decode steps past the window run fused and
    match transformers' reading of the same file (test_models.py's tolerance)."""
    assert cpu_kernels.library_available()   # built under the usual cache folder, not tmp_path's
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    make_config, cls, _ = GGUF_CONFIGS[arch]
    hf = AutoModelForCausalLM.from_pretrained(
        save_random_model(make_config(), tmp_path / "model"), dtype=torch.float32).eval()
    path = write_gemma_gguf(hf, tmp_path / "tiny-q8.gguf", arch, Q.Q8_0)
    files = resolve_model(path)
    ours = cls(load_config(files), torch.float32)
    load_model_weights(ours, files, EngineConfig(quantization="int4"), "cpu", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny-q8.gguf", dtype=torch.float32,
        attn_implementation="eager").eval()
    check_decode_steps(reference, PagedDriver(ours), PROMPTS, steps=3)
    assert fused_steps == [len(PROMPTS)] * 3


@pytest.mark.parametrize("rows,inter", [(1, 100), (7, 512)])
def test_gelu_tanh_and_mul_matches_torch(rows, inter, cpp_compiler):
    """Against torch's F.gelu(approximate="tanh") * up in float64: within float32 rounding
    (gates from -12 to 12, where the tanh saturates both ways)."""
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * inter, generator=g) * 4
    gate_up[0, :24] = torch.linspace(-12, 12, 24)
    gate, up = gate_up.double().chunk(2, dim=-1)
    expected = F.gelu(gate, approximate="tanh") * up
    torch.testing.assert_close(cpu_kernels.gelu_tanh_and_mul(gate_up).double(), expected,
                               rtol=4e-6, atol=1e-6)
