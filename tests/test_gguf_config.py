"""GGUF configs (model_files.load_config with gguf_config.fix_gguf_config): each fact that
transformers' GGUF parsing misses or gets wrong, from files holding the metadata llama.cpp's
converter writes for a transformers config, against that config. The files hold metadata and
one small tensor: no weights are needed to build a config."""

import gguf
import numpy as np
import pytest
import torch
from gguf_files import add_shape_keys
from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MixtralConfig,
                          Phi3Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)

from aphrodite.executor.models import get_model_class
from aphrodite.executor.models.llama import LlamaForCausalLM
from aphrodite.executor.models.mixtral import MixtralForCausalLM
from aphrodite.model_files import head_dim, load_config, resolve_model, rope_settings

DIMS = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)


def write_config(path, arch: str, config, extra=lambda writer: None, tensors=None):
    """The keys every converter writes, then extra(writer)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    add_shape_keys(writer, config)
    rope = config.rope_parameters       # Gemma 3's is keyed by layer type: the global base
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    if getattr(config, "head_dim", None) and arch != "llama":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    extra(writer)
    writer.add_tensor("token_embd.weight", np.zeros((config.vocab_size, 32), np.float32))
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return load_config(resolve_model(str(path)))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))


def test_head_dim_from_key_length(tmp_path):
    """transformers maps no key_length for qwen3: it kept Qwen3Config's 128."""
    written = Qwen3Config(**DIMS, head_dim=32)
    config = write_config(tmp_path / "q.gguf", "qwen3", written)
    assert head_dim(config) == 32


def test_mixtral_as_llama_is_mixtral(tmp_path):
    """llama.cpp writes Mixtral as arch llama plus expert counts; transformers made it a
    dense Llama."""
    written = MixtralConfig(**DIMS, num_local_experts=4, num_experts_per_tok=2, head_dim=32,
                            rope_theta=1e6)

    def experts(writer):
        writer.add_rope_dimension_count(written.head_dim)
        writer.add_expert_count(written.num_local_experts)
        writer.add_expert_used_count(written.num_experts_per_tok)

    config = write_config(tmp_path / "m.gguf", "llama", written, experts)
    assert isinstance(config, MixtralConfig) and get_model_class(config) is MixtralForCausalLM
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
    assert (head_dim(config), config.intermediate_size, config.num_key_value_heads) == (32, 96, 2)
    assert rope_settings(config) == rope_settings(written)
    again = load_config(resolve_model(str(tmp_path / "m.gguf")))     # from the cache
    assert isinstance(again, MixtralConfig) and again.num_local_experts == 4


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen3moe"])
def test_expert_sizes_and_top_k(tmp_path, arch):
    """transformers kept Qwen2MoeConfig's 1408 / 5632 and Qwen3MoeConfig's 768."""
    cls = Qwen2MoeConfig if arch == "qwen2moe" else Qwen3MoeConfig
    written = cls(**DIMS, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                  shared_expert_intermediate_size=56, norm_topk_prob=arch == "qwen3moe")

    def experts(writer):
        writer.add_expert_count(written.num_experts)
        writer.add_expert_used_count(written.num_experts_per_tok)
        writer.add_expert_feed_forward_length(written.moe_intermediate_size)
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(written.shared_expert_intermediate_size)

    config = write_config(tmp_path / "q.gguf", arch, written, experts)
    facts = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
             "intermediate_size") + (("shared_expert_intermediate_size",)
                                     if arch == "qwen2moe" else ())
    assert {f: getattr(config, f) for f in facts} == {f: getattr(written, f) for f in facts}


def test_expert_weights_norm_where_the_file_has_it(tmp_path):
    written = Qwen2MoeConfig(**DIMS, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    config = write_config(tmp_path / "q.gguf", "qwen2moe", written,
                          lambda writer: writer.add_expert_weights_norm(True))
    assert config.norm_topk_prob is True


def test_linear_rope_scaling(tmp_path):
    written = LlamaConfig(**DIMS, rope_scaling={"rope_type": "linear", "factor": 2.0})

    def scaling(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)

    config = write_config(tmp_path / "l.gguf", "llama", written, scaling)
    assert rope_settings(config) == rope_settings(written)


def test_yarn_is_named_so_that_the_model_refuses_it(tmp_path):
    """We do not apply YaRN: a file scaled so fails to load instead of running unscaled."""
    def scaling(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(64)

    config = write_config(tmp_path / "y.gguf", "llama", LlamaConfig(**DIMS), scaling)
    assert rope_settings(config).rope_type == "yarn"
    with pytest.raises(NotImplementedError, match="yarn"):
        LlamaForCausalLM(config, torch.float32)


def test_gemma3_rope_bases_window_and_global_scaling(tmp_path):
    """Local layers 10k, global 1M with the file's linear scaling (Gemma 3 4B and up), and the
    window and its every-sixth-layer-global pattern."""
    written = Gemma3TextConfig(**{**DIMS, "num_hidden_layers": 6}, head_dim=32, sliding_window=8,
                               rope_parameters={
                                   "sliding_attention": {"rope_type": "default",
                                                         "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                      "rope_theta": 1e6}})

    def gemma(writer):
        writer.add_sliding_window(written.sliding_window)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(8.0)

    config = write_config(tmp_path / "g.gguf", "gemma3", written, gemma)
    assert config.rope_parameters == written.rope_parameters
    assert (head_dim(config), config.sliding_window) == (32, 8)
    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    assert config.layer_types == written.layer_types == pattern


@pytest.mark.parametrize("arch, cls, layers", [("gemma2", Gemma2Config, 46),
                                               ("gemma3", Gemma3TextConfig, 62)])
def test_gemma_27b_query_pre_attn_scalar(tmp_path, arch, cls, layers):
    """The 27B models scale queries by hidden / heads (Gemma 2 27B: 144, Gemma 3 27B: 168, in
    their HF configs), the others by the config default 256; llama.cpp tells 27B by its layer
    count. Real 27B dimensions, so the expected value is the HF config's."""
    hidden, expected = (4608, 144) if arch == "gemma2" else (5376, 168)
    written = cls(**{**DIMS, "hidden_size": hidden, "num_attention_heads": 32,
                     "num_key_value_heads": 16, "num_hidden_layers": layers}, head_dim=128)
    config = write_config(tmp_path / "g.gguf", arch, written,
                          lambda writer: writer.add_sliding_window(4096))
    assert config.query_pre_attn_scalar == expected
    small = write_config(tmp_path / "s.gguf", arch, cls(**DIMS, head_dim=32),
                         lambda writer: writer.add_sliding_window(4096))
    assert small.query_pre_attn_scalar == 256


def test_phi3_longrope_window_and_original_context(tmp_path):
    """The factors are tensors in the file, the original context and the window metadata
    (Phi3MiniModel in llama.cpp's converter)."""
    half = DIMS["hidden_size"] // DIMS["num_attention_heads"] // 2
    long, short = [float(4 + i) for i in range(half)], [1 + i / 8 for i in range(half)]
    written = Phi3Config(**DIMS, pad_token_id=0, original_max_position_embeddings=64,
                         sliding_window=128, rope_scaling={"rope_type": "longrope",
                                                           "long_factor": long,
                                                           "short_factor": short})

    def phi3(writer):
        writer.add_rope_scaling_orig_ctx_len(64)
        writer.add_rope_dimension_count(2 * half)
        writer.add_sliding_window(128)
        writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(4) / np.log(64))))

    tensors = {"rope_factors_long.weight": np.array(long, np.float32),
               "rope_factors_short.weight": np.array(short, np.float32)}
    config = write_config(tmp_path / "p.gguf", "phi3", written, phi3, tensors)
    assert rope_settings(config) == rope_settings(written)
    assert (config.original_max_position_embeddings, config.sliding_window) == (64, 128)
    again = load_config(resolve_model(str(tmp_path / "p.gguf")))     # from the cache
    assert rope_settings(again) == rope_settings(written)
    plain = write_config(tmp_path / "q.gguf", "phi3", Phi3Config(**DIMS, pad_token_id=0),
                         lambda writer: (writer.add_rope_scaling_orig_ctx_len(256),
                                         writer.add_sliding_window(0)))
    assert rope_settings(plain).rope_type == "default" and plain.sliding_window is None
