"""Mixture-of-experts models (models/mixtral.py, models/qwen_moe.py) vs HF transformers on tiny
random models: float32 logits over a batched prefill, paged decode steps with shuffled blocks
and a chunked prefill (test_models.py's PagedDriver, atol = rtol = 1e-4); fused expert tensors
(transformers 5's in-memory layout) load like per-expert ones; a missing expert matrix is an
error; tensor parallel against one rank; greedy tokens through the whole engine against
transformers' generate (Mixtral)."""

import pytest
import torch
from test_models import (ATOL, LONG_PROMPT, PROMPTS, RTOL, SMALL, PagedDriver,
                         check_chunked_prefill, check_engine_greedy, check_prefill_then_decode,
                         hf_logits, load_ours, save_random_model, save_word_tokenizer)
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from aphrodite.executor.loader import iter_weights
from aphrodite.executor.models import get_model_class
from aphrodite.executor.models.fused_decode import NoFusedDecode
from aphrodite.executor.models.mixtral import MixtralForCausalLM, MoeForCausalLM
from aphrodite.executor.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from aphrodite.model_files import load_config, resolve_model

MOE = {**SMALL, "intermediate_size": 32}
QWEN_MOE = dict(moe_intermediate_size=32, shared_expert_intermediate_size=48)

VARIANTS = {
    "mixtral-4x2": lambda: MixtralConfig(**MOE, num_local_experts=4, num_experts_per_tok=2),
    "mixtral-8x3-head-dim-tied": lambda: MixtralConfig(**MOE, num_local_experts=8,
                                                       num_experts_per_tok=3, head_dim=32,
                                                       tie_word_embeddings=True),
    # layer 1 dense (mlp_only_layers), top-k weights not renormalised
    "qwen2moe-dense-layer": lambda: Qwen2MoeConfig(**SMALL, **QWEN_MOE, num_experts=6,
                                                   num_experts_per_tok=2, norm_topk_prob=False,
                                                   mlp_only_layers=[1]),
    # decoder_sparse_step 2: layer 0 dense, layer 1 sparse; renormalised
    "qwen2moe-sparse-step": lambda: Qwen2MoeConfig(**SMALL, **QWEN_MOE, num_experts=4,
                                                   num_experts_per_tok=2, norm_topk_prob=True,
                                                   decoder_sparse_step=2),
    # QK-norm, head_dim apart from hidden / heads, layer 0 dense
    "qwen3moe-head-dim": lambda: Qwen3MoeConfig(**SMALL, moe_intermediate_size=32, head_dim=32,
                                                num_experts=6, num_experts_per_tok=2,
                                                norm_topk_prob=True, mlp_only_layers=[0]),
    "qwen3moe-bias-unnormalised": lambda: Qwen3MoeConfig(**SMALL, moe_intermediate_size=32,
                                                         num_experts=4, num_experts_per_tok=3,
                                                         norm_topk_prob=False, attention_bias=True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def moe_pair(request, tmp_path_factory):
    folder = save_random_model(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, load_ours(folder)


def test_prefill_then_batched_decode(moe_pair):
    hf, ours = moe_pair
    check_prefill_then_decode(hf, PagedDriver(ours), PROMPTS, decode_steps=4)


def test_chunked_prefill(moe_pair):
    hf, ours = moe_pair
    check_chunked_prefill(hf, PagedDriver(ours, seed=1), LONG_PROMPT, PROMPTS["b"], (6, 15))


def _checkpoint(tmp_path, variant="mixtral-4x2"):
    folder = save_random_model(VARIANTS[variant](), tmp_path)
    files = resolve_model(folder)
    return folder, load_config(files), list(iter_weights(files, progress=False))


def test_fused_expert_tensors_load_like_per_expert_ones(tmp_path):
    folder, config, weights = _checkpoint(tmp_path)
    per_expert = dict(weights)
    fused, experts = [], {}
    for name, tensor in weights:
        if ".experts." not in name:
            fused.append((name, tensor))
            continue
        layer = name.split(".")[2]
        experts.setdefault(layer, {}).setdefault(name.split(".")[-2], []).append(tensor)
    for layer, mats in experts.items():   # w1 = gate, w3 = up, w2 = down, experts 0..3 in order
        prefix = f"model.layers.{layer}.mlp.experts"
        fused.append((f"{prefix}.gate_up_proj", torch.stack([torch.cat([g, u]) for g, u in
                                                            zip(mats["w1"], mats["w3"])])))
        fused.append((f"{prefix}.down_proj", torch.stack(mats["w2"])))
    assert len(fused) < len(per_expert)
    model = MixtralForCausalLM(config, torch.float32)
    model.load_weights(fused)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = PagedDriver(model.eval()).step(PROMPTS)
    for name, tokens in PROMPTS.items():
        torch.testing.assert_close(out[name], hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


def test_missing_expert_is_an_error(tmp_path):
    _, config, weights = _checkpoint(tmp_path)
    dropped = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    kept = [(n, t) for n, t in weights if n != dropped]
    assert len(kept) == len(weights) - 1
    with pytest.raises(ValueError, match="missing.*experts.gate_up_proj.weight.2.up"):
        MixtralForCausalLM(config, torch.float32).load_weights(kept)


def test_registry_and_no_fused_decode():
    mixtral = get_model_class(VARIANTS["mixtral-4x2"]())
    assert mixtral is MixtralForCausalLM
    assert get_model_class(VARIANTS["qwen2moe-dense-layer"]()) is Qwen2MoeForCausalLM
    assert get_model_class(VARIANTS["qwen3moe-head-dim"]()) is Qwen3MoeForCausalLM
    assert issubclass(Qwen2MoeForCausalLM, MoeForCausalLM)
    model = mixtral(VARIANTS["mixtral-4x2"](), torch.float32)
    assert isinstance(model.fused_decode, NoFusedDecode)


# ---------------------------------------------------------------------------------------------
# Tensor parallel: two gloo ranks on CPU (test_models.py's worker) give the single-rank logits;
# each expert's intermediate dimension is split, as are the shared expert's and the dense MLP's.


def test_tensor_parallel_matches_single_rank(tmp_path):
    from test_models import _tp_worker
    folder = save_random_model(VARIANTS["qwen2moe-dense-layer"](), tmp_path / "model")
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
# The whole engine


@pytest.mark.slow
def test_mixtral_greedy_through_the_engine_matches_generate(tmp_path):
    config = MixtralConfig(**MOE, num_local_experts=4, num_experts_per_tok=2,
                           eos_token_id=None, bos_token_id=None, pad_token_id=None)
    folder = save_random_model(config, tmp_path)
    save_word_tokenizer(folder, config.vocab_size)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    check_engine_greedy(folder, hf, [PROMPTS["b"], PROMPTS["c"]])
