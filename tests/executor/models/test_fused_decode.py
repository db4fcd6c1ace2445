"""Decode steps of a quantised model in one C++ call (kernels/decode_layers.h) against the
layer-by-layer torch forward of the same model: hidden states, the KV cache it writes, and
greedy tokens on the default model."""

import gguf
import numpy as np
import pytest
import torch
from random_gguf_blocks import random_blocks
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from aphrodite.executor.layers.attention import (AttentionConfig, AttentionMetadata,
                                                 allocate_kv_caches)
from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.quantized import QuantizedParts, QuantizedWeight, parts_from_gguf
from aphrodite.executor.models import fused_decode, get_model_class

Q = gguf.GGMLQuantizationType
BLOCK = 4
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5)
VARIANTS = {
    "llama": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "llama-biases": lambda: LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: Qwen2Config(**SMALL, tie_word_embeddings=True),
}
# Each projection in another GGUF type, so both block kinds and Q4_0's conversion run.
TYPES = {"q_proj": Q.Q4_0, "k_proj": Q.Q4_0, "v_proj": Q.Q4_0, "o_proj": Q.Q8_0,
         "gate_proj": Q.Q4_1, "up_proj": Q.Q4_1, "down_proj": Q.Q4_1}


def quantised_model(config, types=TYPES, random_types=()):
    """A tiny random model of `config` whose projections hold GGUF blocks of types[projection]
    (gguf's quantisation of the random weights; random valid blocks for random_types, the
    K-quants gguf cannot quantise)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name
                        else 0.15 * torch.randn_like(param))
    weights = {n: t.detach() for n, t in hf.state_dict().items()}
    for seed, (name, tensor) in enumerate(weights.items()):   # as the loader hands them over
        kind = next((t for p, t in types.items() if f".{p}.weight" in name), None)
        if kind in random_types:
            blocks = random_blocks(kind, *tensor.shape, seed=seed).numpy()
            weights[name] = QuantizedParts(kind, blocks, tensor.shape[1])
        elif kind is not None:
            raw = gguf.quants.quantize(tensor.numpy(), kind)
            weights[name] = parts_from_gguf(raw, kind, tuple(tensor.shape))
    model = get_model_class(config)(config, torch.float32)
    model.load_weights(weights.items())
    return model.eval()


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


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("family", list(VARIANTS))
@pytest.mark.parametrize("batch", [3, 10])     # 10: the quantised matmuls take panels
@torch.inference_mode()
def test_fused_decode_matches_layer_by_layer(family, batch, cache_dtype, cpp_compiler,
                                             fused_steps):
    model = quantised_model(VARIANTS[family]())
    assert isinstance(model.layers[1].self_attn.o_proj.weight, QuantizedWeight)
    check_fused_steps(model, batch, cache_dtype, fused_steps)


def check_fused_steps(model, batch: int, cache_dtype: torch.dtype, fused_steps: list[int],
                      atol: float = 1e-5):
    """Prefills contexts of 1 to 15 tokens, then three decode steps of `batch` sequences,
    each run fused and again layer by layer from the same caches: the same final hidden
    states, logits and written caches (atol on the hidden states and caches, and on the
    logits relative to their largest; a float16 cache's elements within one float16 step,
    as float32 rounding differences upstream may round them the other way)."""
    assert fused_decode.layer_weights(model.layers) is not None
    vocab = model.config.vocab_size
    rng = np.random.default_rng(1)
    lengths = [3, 9, 14, 5, 1, 12, 7, 2, 15, 8][:batch]   # contexts before the decode steps
    tables = np.arange(len(lengths) * 5).reshape(len(lengths), 5)[:, ::-1].copy()
    caches = allocate_kv_caches(len(model.layers), tables.size, BLOCK, model.num_kv_heads,
                                model.head_dim, cache_dtype, "cpu")

    def slot(seq, position):
        return tables[seq, position // BLOCK] * BLOCK + position % BLOCK

    for seq, n in enumerate(lengths):          # prefill
        meta = AttentionMetadata.build(np.array([n]), np.array([n]), tables[seq:seq + 1],
                                       slot(seq, np.arange(n)), AttentionConfig.for_cache(
                                           caches[0], model.config.num_attention_heads,
                                           model.dtype))
        model(torch.tensor(rng.integers(0, vocab, n)), torch.arange(n), caches, meta)
    fused_steps.clear()                        # (a one-token prefill is a decode step too)
    for step in range(3):
        positions = np.array(lengths) + step
        slots = np.array([slot(s, p) for s, p in enumerate(positions)])
        if step == 2:
            slots[1] = -1                      # a token whose key and value are not stored
        meta = AttentionMetadata.build(np.ones(batch), positions + 1, tables, slots,
                                       AttentionConfig.for_cache(
                                           caches[0], model.config.num_attention_heads,
                                           model.dtype))
        ids = torch.tensor(rng.integers(0, vocab, batch))
        before = [c.clone() for c in caches]
        fused = model(ids, torch.from_numpy(positions), caches, meta)
        assert fused_steps == [batch] * (step + 1)    # the fused path ran
        fused_caches = [c.clone() for c in caches]
        for cache, saved in zip(caches, before):
            cache.copy_(saved)
        model.fused_decode.enabled = False
        reference = model(ids, torch.from_numpy(positions), caches, meta)
        model.fused_decode.enabled = True
        assert len(fused_steps) == step + 1           # and the reference layer by layer
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=atol)
        logits = model.compute_logits(reference)
        torch.testing.assert_close(model.compute_logits(fused), logits, rtol=1e-5,
                                   atol=atol * logits.abs().max().item())
        for ours, theirs in zip(fused_caches, caches):   # float16: one rounding may flip
            torch.testing.assert_close(ours, theirs, rtol=1e-3 if ours.dtype == torch.float16
                                       else 1e-5, atol=atol)
            assert ours.dtype == cache_dtype


def default_model_greedy(model, config, fused: bool, cache_dtype: torch.dtype,
                         fused_steps: list[int], forced: list[int] | None = None
                         ) -> tuple[list[int], torch.Tensor]:
    """32 greedy decode steps after a short chat prompt (or the tokens `forced` gives):
    the tokens, and each step's logits [32, vocab]."""
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 28, 17, 2, 198]
    model.fused_decode.enabled = fused
    steps_before = len(fused_steps)
    caches = allocate_kv_caches(config.num_hidden_layers, 4, 16, model.num_kv_heads,
                                model.head_dim, cache_dtype, "cpu")
    table = np.arange(4)[None]
    tokens, logits = list(prompt), []
    meta = AttentionMetadata.build(np.array([len(tokens)]), np.array([len(tokens)]), table,
                                   np.arange(len(tokens)), AttentionConfig.for_cache(
                                       caches[0], config.num_attention_heads, model.dtype))
    hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), caches, meta)
    for step in range(32):
        logits.append(model.compute_logits(hidden[-1:])[0])
        tokens.append(forced[len(prompt) + step] if forced else int(logits[-1].argmax()))
        n = len(tokens)
        meta = AttentionMetadata.build(np.array([1]), np.array([n]), table, np.array([n - 1]),
                                       AttentionConfig.for_cache(
                                           caches[0], config.num_attention_heads, model.dtype))
        hidden = model(torch.tensor(tokens[-1:]), torch.tensor([n - 1]), caches, meta)
    assert (len(fused_steps) > steps_before) == fused
    return tokens, torch.stack(logits)


@pytest.fixture(scope="module")
def default_model():
    from aphrodite.config import EngineConfig
    from aphrodite.executor.loader import load_model_weights
    from aphrodite.model_files import load_config, resolve_model

    files = resolve_model(None)
    config = load_config(files)
    model = get_model_class(config)(config, torch.float32)
    load_model_weights(model, files, EngineConfig(quantization="int4"), "cpu", progress=False)
    return model, config


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@torch.inference_mode()
def test_default_model_fused_greedy_tokens(default_model, cache_dtype, cpp_compiler,
                                           fused_steps):
    """32 greedy decode steps of the default GGUF model, quantised: the same tokens fused and
    layer by layer, with either cache."""
    model, config = default_model
    fused = default_model_greedy(model, config, True, cache_dtype, fused_steps)[0]
    assert default_model_greedy(model, config, False, cache_dtype, fused_steps)[0] == fused


@torch.inference_mode()
def test_default_model_float16_cache_logits(default_model, cpp_compiler, fused_steps):
    """A float16 cache only rounds keys and values: on the float32 cache's greedy tokens, each
    step's logits stay within 0.05 of the float32 cache's (they span about 40; 0.024 seen) and the
    same token comes out on top."""
    model, config = default_model
    tokens, reference = default_model_greedy(model, config, True, torch.float32, fused_steps)
    _, logits = default_model_greedy(model, config, True, torch.float16, fused_steps,
                                     forced=tokens)
    assert (logits - reference).abs().max() < 0.05
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


@torch.inference_mode()
def test_fused_decode_writes_the_caches_it_is_given(cpp_compiler, fused_steps):
    """A forward with another list of caches (the first one shared) writes that list's caches,
    not those of the previous call."""
    model = quantised_model(VARIANTS["llama"]())
    first = allocate_kv_caches(2, 2, BLOCK, model.num_kv_heads, model.head_dim, torch.float32,
                               "cpu")
    second = [first[0], torch.zeros_like(first[1])]
    meta = AttentionMetadata.build(np.ones(1), np.array([1]), np.array([[0, 1]]), np.array([0]),
                                   AttentionConfig.for_cache(
                                       first[0], model.config.num_attention_heads, model.dtype))
    model(torch.tensor([3]), torch.tensor([0]), first, meta)
    assert fused_steps == [1] and first[1].abs().sum() > 0
    written = first[1].clone()
    first[1].zero_()
    model(torch.tensor([3]), torch.tensor([0]), second, meta)
    assert first[1].abs().sum() == 0
    torch.testing.assert_close(second[1], written)
