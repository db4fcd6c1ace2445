"""The architectures beyond Llama, and K-quant GGUF files, on CUDA. Skipped without CUDA.

Each tiny random model's greedy tokens on the GPU (CUDA graphs where the model allows them)
equal its eager GPU tokens and its CPU tokens; a GGUF file of K-quant matrices loads on the
GPU dequantised to bfloat16, equal to the CPU's float32 dequantisation rounded once.
"""

import gguf
import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig,
                          MixtralConfig, Phi3Config, Qwen2MoeConfig, Qwen3Config)

from aphrodite import LLM, SamplingParams
from aphrodite.config import EngineConfig
from aphrodite.executor.layers.quantized import QuantizedWeight
from aphrodite.executor.loader import iter_weights, load_model_weights
from aphrodite.executor.models import get_model_class
from aphrodite.model_files import load_config, resolve_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 512
SMALL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
WINDOW = 16   # shorter than the long prompt below, so the sliding layers mask
ARCHITECTURES = {
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=64),
    "phi3": lambda: Phi3Config(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma3": lambda: Gemma3TextConfig(**SMALL, head_dim=32, sliding_window=WINDOW,
                                       layer_types=["sliding_attention", "full_attention",
                                                    "sliding_attention"]),
    "gemma2": lambda: Gemma2Config(**SMALL, head_dim=32, sliding_window=WINDOW),
    "mixtral": lambda: MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen2moe": lambda: Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=64,
                                       shared_expert_intermediate_size=96),
}
PROMPTS = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12, 14], [7] * 20,
           [(i * 7) % VOCAB for i in range(100)]]


def save_tiny(config, folder) -> str:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():   # spread the weights: default init gives near-uniform logits
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param)) if "norm" in name \
                else param.normal_(0, 0.15)
    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return str(folder)


def greedy(model, device, **engine_args):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(model, dtype="float32", device=device, **engine_args) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_on_gpu_matches_eager_and_cpu(arch, tmp_path):
    folder = save_tiny(ARCHITECTURES[arch](), tmp_path / arch)
    on_gpu = greedy(folder, "cuda")
    assert on_gpu == greedy(folder, "cuda", enforce_eager=True)
    assert on_gpu == greedy(folder, "cpu")


def random_blocks(ggml_type, rows: int, cols: int, rng) -> np.ndarray:
    """Valid GGUF blocks of a [rows, cols] matrix: random codes and scales, the float16 fields
    small and finite (gguf cannot quantise to K-quants, but any such bytes are a block)."""
    values, size = gguf.GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (rows * cols // values, size), dtype=np.uint8)
    halves = {gguf.GGMLQuantizationType.Q6_K: [208]}.get(ggml_type, [0, 2])
    for at in halves:   # d (and dmin)
        blocks[:, at:at + 2] = rng.uniform(1e-3, 4e-3, (len(blocks), 1)).astype(np.float16) \
            .view(np.uint8)
    return blocks.reshape(rows, -1)


def test_kquant_gguf_loads_on_gpu_as_bfloat16(tmp_path):
    Q = gguf.GGMLQuantizationType
    config = LlamaConfig(**{**SMALL, "hidden_size": 256, "intermediate_size": 512})
    path = str(tmp_path / "kquants.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(256)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    rng = np.random.default_rng(0)
    kinds = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0]
    shapes = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256),
              "attn_output": (256, 256), "ffn_gate": (512, 256), "ffn_up": (512, 256),
              "ffn_down": (256, 512)}
    writer.add_tensor("token_embd.weight", random_blocks(Q.Q6_K, VOCAB, 256, rng), raw_dtype=Q.Q6_K)
    writer.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    for layer in range(config.num_hidden_layers):
        for i, (name, (rows, cols)) in enumerate(shapes.items()):
            kind = kinds[(i + layer) % len(kinds)]
            writer.add_tensor(f"blk.{layer}.{name}.weight", random_blocks(kind, rows, cols, rng),
                              raw_dtype=kind)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    files = resolve_model(path)
    hf_config = load_config(files)
    with torch.device("cuda"):
        model = get_model_class(hf_config)(hf_config, torch.bfloat16)
    load_model_weights(model, files, EngineConfig(), "cuda", progress=False)
    # gguf's float32 dequantisation (Q/K rows un-permuted), rounded once to bfloat16
    reference = {name: w.to(torch.bfloat16) for name, w in iter_weights(files, progress=False)}

    def expect(weight, *names):
        assert not isinstance(weight, QuantizedWeight)
        assert weight.device.type == "cuda" and weight.dtype == torch.bfloat16
        assert torch.equal(weight.cpu(), torch.cat([reference[n] for n in names])), names

    expect(model.embed_tokens, "model.embed_tokens.weight")
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        expect(layer.self_attn.qkv_proj.weight,
               *(f"{prefix}self_attn.{p}_proj.weight" for p in "qkv"))
        expect(layer.self_attn.o_proj.weight, f"{prefix}self_attn.o_proj.weight")
        expect(layer.mlp.gate_up_proj.weight,
               f"{prefix}mlp.gate_proj.weight", f"{prefix}mlp.up_proj.weight")
        expect(layer.mlp.down_proj.weight, f"{prefix}mlp.down_proj.weight")
