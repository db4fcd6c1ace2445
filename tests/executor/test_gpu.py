"""CUDA paths: CUDA-graph decode vs eager, GPU vs CPU greedy output, the Triton decode kernel.
Skipped without CUDA."""

import pytest
import torch

from aphrodite import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12, 14], [7] * 20, [3, 1, 4, 1, 5, 9, 2, 6]]
VOCAB = 512


def word_level_tokenizer():
    """A tokenizer built in memory, so the test needs no model files on the GPU machine."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    word_level_tokenizer().save_pretrained(path)
    return str(path)


def greedy(model, prompts=PROMPTS, max_tokens=24, **engine_args):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(model, dtype="float32", **engine_args) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_cuda_graphs_match_eager(tiny_llama):
    assert greedy(tiny_llama, device="cuda") == greedy(tiny_llama, device="cuda",
                                                       enforce_eager=True)


def test_gpu_matches_cpu(tiny_llama):
    # Long enough prompts that decode crosses the Triton kernel's context splits (512 tokens).
    prompts = PROMPTS + [[(i * 7) % VOCAB for i in range(700)]]
    assert greedy(tiny_llama, prompts, 40, device="cuda") == \
        greedy(tiny_llama, prompts, 40, device="cpu")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (9, 3, 64), (8, 8, 128)])
@pytest.mark.parametrize("window,softcap", [(None, None), (500, None), (37, None),
                                            (None, 5.0), (600, 2.0)])
def test_triton_decode_matches_torch_reference(dtype, tol, heads, kv_heads, head_dim, window,
                                               softcap):
    """Contexts shorter and longer than the window (500 and 600: the splits then cover the
    window, not the 3000-token context), windows not a multiple of the block size."""
    from aphrodite.executor.layers.attention.kv_cache import gather_context
    from aphrodite.executor.kernels.triton.paged_decode import paged_decode_attention
    torch.manual_seed(0)
    block_size, num_blocks = 16, 400
    lens = [1, 17, 511, 513, 3000]
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    order = torch.randperm(num_blocks)
    width = -(-max(lens) // block_size)
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    used = 0
    for row, length in enumerate(lens):
        blocks = -(-length // block_size)
        tables[row, :blocks] = order[used:used + blocks]
        used += blocks
    tables = tables.cuda()
    q = torch.randn(len(lens), heads, head_dim, dtype=dtype, device="cuda")
    got = paged_decode_attention(q, cache, tables, torch.tensor(lens, device="cuda"),
                                 max(lens), 0.1, window, softcap)
    for row, length in enumerate(lens):   # per-row float64 reference
        keys = gather_context(cache[0], tables[row], width)[:length].double()
        values = gather_context(cache[1], tables[row], width)[:length].double()
        group = heads // kv_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,shd->hs", q[row].double(), keys) * 0.1
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if window is not None:   # the new token sits at length - 1
            scores[:, :max(0, length - window)] = float("-inf")
        probs = torch.softmax(scores, -1)
        want = torch.einsum("hs,shd->hd", probs, values)
        assert torch.allclose(got[row].double(), want, atol=tol, rtol=tol), (row, length)
