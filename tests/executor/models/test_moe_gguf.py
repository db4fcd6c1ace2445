"""GGUF files of the mixture-of-experts models and Phi-3, written as llama.cpp's converter
writes them: experts stacked per layer (ffn_gate_exps / ffn_up_exps / ffn_down_exps,
[experts, rows, cols]), the router ffn_gate_inp kept float, Qwen2-MoE's shared expert (*_shexp)
with its gate stored as a vector; Mixtral as arch `llama` with its Q/K rows permuted; Phi-3's
fused attn_qkv and ffn_up (gate then up) and its LongRoPE factors as the tensors
rope_factors_long / rope_factors_short.

Our logits (test_models.py's PagedDriver: batched prefill, paged decode steps, a chunked
prefill; atol = rtol = 1e-4) against transformers float32 on the same weights: transformers
loading the GGUF where it can (Qwen2-MoE, Qwen3-MoE, Phi-3 without LongRoPE: its GGUF config
drops the scaling), else the transformers model the file was written from (Mixtral, which
transformers reads as a dense Llama; LongRoPE Phi-3). F32, F16 and Q8_0 files (Q8_0 experts are
dequantised one expert at a time; Q8_0 matrices stay GGUF blocks in int4 mode, and Phi-3's
decode steps then run as one fused C++ call). The prefill
batch routes uneven token counts to the experts. One GGUF MoE model through the whole engine.
"""

import re

import gguf
import numpy as np
import pytest
import torch
from gguf_files import add_byte_tokenizer, llama_cpp_permute, write_gguf
from test_models import (LONG_PROMPT, PROMPTS, SMALL, PagedDriver, check_chunked_prefill,
                         check_prefill_then_decode, hf_logits, load_ours, save_random_model)
from transformers import (AutoModelForCausalLM, MixtralConfig, Phi3Config, Qwen2MoeConfig,
                          Qwen3MoeConfig)

from aphrodite.config import EngineConfig
from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers import moe
from aphrodite.executor.layers.quantized import QuantizedWeight
from aphrodite.executor.loader import load_model_weights
from aphrodite.executor.models import get_model_class
from aphrodite.executor.models.mixtral import MixtralForCausalLM
from aphrodite.executor.models.phi3 import Phi3ForCausalLM
from aphrodite.executor.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from aphrodite.model_files import load_config, max_model_len, resolve_model

F16, Q8_0 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
MOE = {**SMALL, "intermediate_size": 32}
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
         "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
         "mlp.shared_expert.up_proj": "ffn_up_shexp",
         "mlp.shared_expert.down_proj": "ffn_down_shexp",
         "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def split_experts(name: str, array: np.ndarray, per_expert: bool = False):
    """transformers' fused experts (gate_up [E, 2 * inter, hidden], gate rows first; down
    [E, hidden, inter]) as llama.cpp's stacked tensors, or per_expert as its converter wrote
    Mixtral before stacking them (blk.N.ffn_gate.E.weight, ...)."""
    match = _FUSED_EXPERTS.match(name)
    if match is None:
        return None
    layer, matrix = match.groups()
    parts = {"down": array} if matrix == "down_proj" else dict(zip(("gate", "up"),
                                                                   np.split(array, 2, axis=1)))
    if per_expert:
        return [(f"blk.{layer}.ffn_{part}.{e}.weight", stacked[e])
                for part, stacked in parts.items() for e in range(len(stacked))]
    return [(f"blk.{layer}.ffn_{part}_exps.weight", stacked) for part, stacked in parts.items()]


def write_moe_gguf(hf_model, path, arch: str, quant=gguf.GGMLQuantizationType.F32,
                   per_expert: bool = False) -> str:
    config = hf_model.config

    def convert(name: str, array: np.ndarray) -> np.ndarray:
        if arch == "llama" and name.endswith("q_proj.weight"):
            return llama_cpp_permute(array, config.num_attention_heads, config.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            return llama_cpp_permute(array, config.num_attention_heads, config.num_key_value_heads)
        return array.reshape(-1) if name.endswith("shared_expert_gate.weight") else array

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_name(f"tiny {arch}")
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if arch == "llama":
            writer.add_rope_dimension_count(config.head_dim)
        else:
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
        if getattr(config, "head_dim", None) and arch != "llama":
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
        add_byte_tokenizer(writer)

    return write_gguf(path, arch, hf_model, NAMES, quant, convert, metadata,
                      split=lambda name, array: split_experts(name, array, per_expert))


def round_to_f16(model):
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model


def hf_from_gguf(path) -> torch.nn.Module:
    """transformers loading the file's tensors, with our config: its own GGUF config keeps
    the config classes' default expert sizes (tests/test_gguf_config.py)."""
    folder, name = str(path).rsplit("/", 1)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                config=load_config(resolve_model(path))).eval()


@pytest.fixture
def expert_counts(monkeypatch) -> list[list[int]]:
    """Tokens per expert of every run_experts call."""
    counts = []
    run_experts = moe.run_experts

    def counted(x, gate_up, down, weights, experts):
        counts.append(torch.bincount(experts.reshape(-1), minlength=gate_up.shape[0]).tolist())
        return run_experts(x, gate_up, down, weights, experts)
    monkeypatch.setattr(moe, "run_experts", counted)
    return counts


def _moe_case(tmp_path, config, arch, quant=gguf.GGMLQuantizationType.F32, f16=False,
              per_expert=False):
    folder = save_random_model(config, tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if f16:
        round_to_f16(hf)
    return hf, write_moe_gguf(hf, tmp_path / "tiny.gguf", arch, quant, per_expert)


@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per-expert"])
def test_mixtral_gguf_matches_the_model_it_was_written_from(tmp_path, monkeypatch, expert_counts,
                                                            per_expert):
    """llama-arch file, Q/K rows permuted: our config is Mixtral's (gguf_config.py). Experts
    stacked, or one matrix each as in older Mixtral files."""
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    config = MixtralConfig(**MOE, num_local_experts=4, num_experts_per_tok=2, head_dim=32)
    hf, path = _moe_case(tmp_path, config, "llama", per_expert=per_expert)
    ours = load_ours(path)
    assert type(ours) is MixtralForCausalLM and ours.head_dim == 32
    check_prefill_then_decode(hf, PagedDriver(ours), PROMPTS, decode_steps=3)
    first = expert_counts[0]      # layer 0 of the prefill: 22 tokens, top 2 of 4
    assert sum(first) == 2 * sum(len(p) for p in PROMPTS.values()) and len(set(first)) > 1
    check_chunked_prefill(hf, PagedDriver(ours, seed=1), LONG_PROMPT, PROMPTS["b"], (6, 15))


def test_qwen2moe_f16_gguf_matches_transformers(tmp_path, monkeypatch, expert_counts):
    """Shared expert and its vector gate, q/k/v biases; weights F16 in the file (and rounded
    to F16 in the model it was written from)."""
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    config = Qwen2MoeConfig(**SMALL, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                            num_experts=4, num_experts_per_tok=2)
    hf, path = _moe_case(tmp_path, config, "qwen2moe", F16, f16=True)
    ours = load_ours(path)
    assert type(ours) is Qwen2MoeForCausalLM
    check_prefill_then_decode(hf, PagedDriver(ours), PROMPTS, decode_steps=3)
    assert len(set(expert_counts[0])) > 1
    reference = hf_from_gguf(path)
    out = PagedDriver(ours).step(PROMPTS)
    for name, tokens in PROMPTS.items():
        torch.testing.assert_close(out[name], hf_logits(reference, tokens), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_qwen3moe_q8_0_gguf_matches_transformers(tmp_path, monkeypatch, quantization,
                                                 cpp_compiler):
    """Q8_0 matrices and experts, head_dim 32 (not hidden / heads): transformers dequantises
    the same blocks. int4 mode keeps the attention matrices as GGUF blocks (Q8_0 blocks need
    the C++ kernels); the experts are float32 either way."""
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    config = Qwen3MoeConfig(**SMALL, moe_intermediate_size=32, head_dim=32, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True)
    _, path = _moe_case(tmp_path, config, "qwen3moe", Q8_0)
    files = resolve_model(path)
    ours = Qwen3MoeForCausalLM(load_config(files), torch.float32)
    load_model_weights(ours, files, EngineConfig(quantization=quantization), "cpu",
                       progress=False)
    if quantization == "int4":
        assert isinstance(ours.layers[0].self_attn.qkv_proj.weight, QuantizedWeight)
    check_prefill_then_decode(hf_from_gguf(path), PagedDriver(ours.eval()), PROMPTS,
                              decode_steps=3)


# ---------------------------------------------------------------------------------------------
# Phi-3

PHI3_NAMES = {name: NAMES[name] for name in ("self_attn.qkv_proj", "self_attn.o_proj",
                                             "mlp.gate_up_proj", "mlp.down_proj",
                                             "input_layernorm", "post_attention_layernorm")}
HALF_HEAD = SMALL["hidden_size"] // SMALL["num_attention_heads"] // 2


def write_phi3_gguf(hf_model, path, quant=gguf.GGMLQuantizationType.F32) -> str:
    """What llama.cpp's Phi3MiniModel writes (fused tensors as they are)."""
    config = hf_model.config
    rope = config.rope_parameters

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_name("tiny phi3")
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_sliding_window(config.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            scale = config.max_position_embeddings / config.original_max_position_embeddings
            writer.add_rope_scaling_attn_factors(
                float(np.sqrt(1 + np.log(scale) / np.log(config.original_max_position_embeddings))))
        add_byte_tokenizer(writer)
        writer.add_pad_token_id(0)

    extra = None
    if rope.get("rope_type") == "longrope":
        extra = {"rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
                 "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32)}
    return write_gguf(path, "phi3", hf_model, PHI3_NAMES, quant, metadata=metadata,
                      extra_tensors=extra)


def _factors(seed: int, low: float, high: float) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(HALF_HEAD, generator=generator)).tolist()


def test_phi3_longrope_gguf_matches_the_model_it_was_written_from(tmp_path, monkeypatch):
    """The LongRoPE factors come from the file's tensors, the original context and the window
    from its metadata; positions stay within the original context (transformers' short
    factors)."""
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    config = Phi3Config(**SMALL, **TOKENS, original_max_position_embeddings=64, sliding_window=128,
                        rope_scaling={"rope_type": "longrope", "short_factor": _factors(1, 1, 3),
                                      "long_factor": _factors(2, 4, 16)})
    folder = save_random_model(config, tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    path = write_phi3_gguf(hf, tmp_path / "tiny.gguf")
    ours = load_ours(path)
    assert type(ours) is Phi3ForCausalLM and max_model_len(ours.config) == 128
    check_prefill_then_decode(hf, PagedDriver(ours), PROMPTS, decode_steps=3)
    long_prompt = [(i * 37) % 256 for i in range(40)]
    check_chunked_prefill(hf, PagedDriver(ours, seed=1), long_prompt, PROMPTS["b"], (6, 25))


@torch.inference_mode()
def test_phi3_q8_0_gguf_in_int4_mode_matches_transformers(tmp_path, monkeypatch, cpp_compiler):
    """Fused Q8_0 tensors split by rows into GGUF blocks, whose decode steps run as one fused
    C++ call (models/fused_decode.py); transformers loads the same file."""
    assert cpu_kernels.library_available()   # built under the usual cache folder, not tmp_path's
    steps = []
    decode_layers = cpu_kernels.decode_layers
    monkeypatch.setattr(cpu_kernels, "decode_layers",
                        lambda layers, step: steps.append(step) or decode_layers(layers, step))
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    folder = save_random_model(Phi3Config(**SMALL, **TOKENS), tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    path = write_phi3_gguf(hf, tmp_path / "tiny-q8.gguf", Q8_0)
    files = resolve_model(path)
    config = load_config(files)
    ours = get_model_class(config)(config, torch.float32)
    load_model_weights(ours, files, EngineConfig(quantization="int4"), "cpu", progress=False)
    assert isinstance(ours.layers[1].mlp.gate_up_proj.weight, QuantizedWeight)
    check_prefill_then_decode(hf_from_gguf(path), PagedDriver(ours.eval()), PROMPTS,
                              decode_steps=3)
    assert len(steps) == 3


# ---------------------------------------------------------------------------------------------
# The whole engine


@pytest.mark.slow
def test_qwen3moe_gguf_greedy_through_the_engine_matches_generate(tmp_path, monkeypatch):
    """32 greedy tokens per prompt through LLM (the GGUF file's config and tokenizer, the
    scheduler, workers and sampler) equal transformers' generate on the model the file was
    written from."""
    from aphrodite import LLM, SamplingParams
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    config = Qwen3MoeConfig(**SMALL, moe_intermediate_size=32, num_experts=4, head_dim=16,
                            num_experts_per_tok=2, norm_topk_prob=True)
    hf, path = _moe_case(tmp_path, config, "qwen3moe")
    hf.generation_config.eos_token_id = None      # as ignore_eos: EOS may be generated, not end
    prompts = [PROMPTS["b"], PROMPTS["c"]]
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                                pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(path, dtype="float32", num_threads=1, kv_cache_memory=16 << 20) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [len(e) for e in expected] == [32] * len(prompts)
    assert [o.outputs[0].token_ids for o in outs] == expected
