"""Phi-3 (models/phi3.py) vs HF transformers on tiny random models: float32 logits over a
batched prefill, paged decode steps and a chunked prefill (test_models.py's PagedDriver,
atol = rtol = 1e-4), with plain RoPE and with LongRoPE (positions within
original_max_position_embeddings, where transformers uses the short factors); tensor-parallel
shards cut out of the fused checkpoint tensors; greedy tokens through the whole engine."""

import pytest
import torch
from test_models import (PROMPTS, SMALL, PagedDriver, check_chunked_prefill,
                         check_prefill_then_decode, load_ours, save_random_model)
from transformers import AutoModelForCausalLM, Phi3Config

from aphrodite.executor.layers import linear
from aphrodite.executor.loader import iter_weights
from aphrodite.executor.models import get_model_class
from aphrodite.executor.models.phi3 import Phi3ForCausalLM
from aphrodite.model_files import load_config, max_model_len, resolve_model

HEAD_DIM = SMALL["hidden_size"] // SMALL["num_attention_heads"]
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _factors(seed: int, low: float, high: float) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(HEAD_DIM // 2, generator=generator)).tolist()


VARIANTS = {
    "phi3-gqa": lambda: Phi3Config(**SMALL, **TOKENS),
    # Short factors away from 1 so that a wrong factor set or attention factor shows in the logits.
    "phi3-longrope": lambda: Phi3Config(
        **SMALL, **TOKENS, original_max_position_embeddings=64,
        rope_scaling={"rope_type": "longrope", "short_factor": _factors(1, 1.0, 3.0),
                      "long_factor": _factors(2, 4.0, 16.0)}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def phi3_pair(request, tmp_path_factory):
    folder = save_random_model(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, load_ours(folder)


def test_prefill_then_batched_decode(phi3_pair):
    hf, ours = phi3_pair
    assert isinstance(ours, Phi3ForCausalLM)
    check_prefill_then_decode(hf, PagedDriver(ours), PROMPTS, decode_steps=5)


def test_chunked_prefill(phi3_pair):
    hf, ours = phi3_pair
    long_prompt = [(i * 37) % 256 for i in range(40)]     # within original_max (64)
    check_chunked_prefill(hf, PagedDriver(ours, seed=1), long_prompt, PROMPTS["b"], (6, 25))


def test_registry_and_limits():
    assert get_model_class(Phi3Config(architectures=["Phi3ForCausalLM"])) is Phi3ForCausalLM
    assert get_model_class(Phi3Config()) is Phi3ForCausalLM       # GGUF-style: model_type only
    # Phi-3-mini-4k's window (2047) caps the length, as for any windowed model
    assert max_model_len(Phi3Config(max_position_embeddings=4096, sliding_window=2047)) == 2047
    with pytest.raises(NotImplementedError, match="partial_rotary_factor"):
        Phi3ForCausalLM(Phi3Config(**SMALL, partial_rotary_factor=0.75), torch.float32)


def test_tensor_parallel_shards_cut_from_fused_tensors(tmp_path, monkeypatch):
    """Each rank's stacked q/k/v (gate/up) rows are its own slice of each part of the fused
    checkpoint tensor, in our part order (weights left unpacked, so they can be compared)."""
    monkeypatch.setattr(linear, "prepare_weight", lambda weight: weight)
    folder = save_random_model(VARIANTS["phi3-gqa"](), tmp_path)
    files = resolve_model(folder)
    config = load_config(files)
    fused = dict(iter_weights(files, progress=False))
    q_rows = SMALL["num_attention_heads"] * HEAD_DIM
    kv_rows = SMALL["num_key_value_heads"] * HEAD_DIM
    inter = SMALL["intermediate_size"]
    for rank in range(2):
        model = Phi3ForCausalLM(config, torch.float32, tp_rank=rank, tp_size=2)
        model.load_weights(iter_weights(files, progress=False))
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}"
            q, k, v = fused[f"{prefix}.self_attn.qkv_proj.weight"].split([q_rows, kv_rows, kv_rows])
            gate, up = fused[f"{prefix}.mlp.gate_up_proj.weight"].split([inter, inter])
            expected_qkv = torch.cat([part.chunk(2)[rank] for part in (q, k, v)])
            expected_gate_up = torch.cat([part.chunk(2)[rank] for part in (gate, up)])
            ours = model.layers[layer]
            assert torch.equal(ours.self_attn.qkv_proj.weight, expected_qkv)
            assert torch.equal(ours.mlp.gate_up_proj.weight, expected_gate_up)


def test_wrong_fused_shape_is_an_error(tmp_path):
    folder = save_random_model(VARIANTS["phi3-gqa"](), tmp_path)
    files = resolve_model(folder)
    weights = [(n, t[:-1] if n.endswith("layers.0.self_attn.qkv_proj.weight") else t)
               for n, t in iter_weights(files, progress=False)]
    with pytest.raises(ValueError, match="qkv_proj"):
        Phi3ForCausalLM(load_config(files), torch.float32).load_weights(weights)


def _word_level_tokenizer(vocab_size: int):
    """A tokenizer built in memory: the engine needs one in the model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w2")


def test_engine_greedy_matches_generate(tmp_path):
    """32 greedy tokens per prompt through LLM (scheduler, workers, sampler, batched decode)
    equal transformers' generate, on the LongRoPE model (every position within the original
    context, so transformers uses the short factors throughout, as we do)."""
    from aphrodite import LLM, SamplingParams
    folder = save_random_model(VARIANTS["phi3-longrope"](), tmp_path)
    _word_level_tokenizer(SMALL["vocab_size"]).save_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = list(PROMPTS.values())
    hf.generation_config.eos_token_id = None      # as ignore_eos: EOS may be generated, not end
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                                pad_token_id=0)[0, len(p):].tolist()
                    for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(folder, dtype="float32", num_threads=1, kv_cache_memory=16 << 20) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [len(e) for e in expected] == [32] * len(prompts)
    assert [o.outputs[0].token_ids for o in outs] == expected
