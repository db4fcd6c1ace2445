"""CUDA paths: CUDA-graph decode vs eager, and GPU vs CPU greedy output. Skipped without CUDA."""

import pytest
import torch

from aphrodite import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12, 14], [7] * 20, [3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    from aphrodite.model_files import load_tokenizer, resolve_model
    tokenizer = load_tokenizer(resolve_model(None))     # any tokenizer will do; reuse ours
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def greedy(model, **engine_args):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(model, dtype="float32", **engine_args) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_cuda_graphs_match_eager(tiny_llama):
    assert greedy(tiny_llama, device="cuda") == greedy(tiny_llama, device="cuda",
                                                       enforce_eager=True)


def test_gpu_matches_cpu(tiny_llama):
    assert greedy(tiny_llama, device="cuda") == greedy(tiny_llama, device="cpu")
