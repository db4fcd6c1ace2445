"""Our Llama-family model over the paged KV cache vs HF transformers (the reference).

Tiny random-weight models of each supported family are saved with save_pretrained and loaded
through our own path (resolve_model -> load_config -> iter_weights -> load_weights). Tolerance on
float32 logits: atol 1e-4, rtol 1e-4. The real default model (SmolLM2 GGUF) is checked against
transformers' own GGUF loading in the slow tests at the end.
"""

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from aphrodite import LLM, SamplingParams
from aphrodite.executor.layers.attention import (AttentionConfig, AttentionMetadata,
                                                 allocate_kv_caches)
from aphrodite.executor.models import LlamaForCausalLM, get_model_class
from aphrodite.executor.loader import iter_weights
from aphrodite.model_files import load_config, load_tokenizer, max_model_len, resolve_model

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

ATOL = RTOL = 1e-4
BLOCK_SIZE = 4


class PagedDriver:
    """Minimal stand-in for the model runner: owns a paged cache, hands out shuffled blocks,
    and runs one flat batch per step."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int = 64, seed: int = 0):
        config = model.config
        self.model = model
        self.caches = allocate_kv_caches(config.num_hidden_layers, num_blocks, BLOCK_SIZE,
                                         model.num_kv_heads, model.head_dim, model.dtype, "cpu")
        self.free = [int(b) for b in np.random.default_rng(seed).permutation(num_blocks)]
        self.tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    @torch.no_grad()
    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Feed each sequence's next tokens; returns each sequence's logits for those tokens."""
        ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for seq, tokens in chunks.items():
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free.pop())
            pos = np.arange(start, end)
            ids += tokens
            positions.append(pos)
            slots.append(np.array(table)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            self.lengths[seq] = end
        width = max(len(self.tables[s]) for s in chunks)
        tables = np.zeros((len(chunks), width), dtype=np.int32)
        for row, seq in enumerate(chunks):
            tables[row, : len(self.tables[seq])] = self.tables[seq]
        meta = AttentionMetadata.build(np.array(query_lens), np.array(seq_lens), tables,
                                       np.concatenate(slots), self.attention_config())
        hidden = self.model(torch.tensor(ids), torch.from_numpy(np.concatenate(positions)),
                            self.caches, meta)
        logits = self.model.compute_logits(hidden)
        return dict(zip(chunks, logits.split(query_lens)))


    def attention_config(self) -> AttentionConfig:
        """As the model runner builds it."""
        return AttentionConfig.for_cache(
            self.caches[0], self.model.config.num_attention_heads, self.model.dtype)


@torch.no_grad()
def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([tokens])).logits[0].float()


def load_ours(path: str, dtype=torch.float32, **kwargs) -> LlamaForCausalLM:
    files = resolve_model(path)
    config = load_config(files)
    model = get_model_class(config)(config, dtype, **kwargs)
    model.load_weights(iter_weights(files, progress=False))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Tiny random models of each family

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5)

VARIANTS = {
    "llama-gqa-untied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=False),
    "llama-mha-tied": lambda: LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "llama31-rope": lambda: LlamaConfig(**SMALL, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "llama-linear-rope": lambda: LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-head-dim": lambda: MistralConfig(**SMALL, head_dim=32, sliding_window=128),
    "qwen2-bias-tied": lambda: Qwen2Config(**{**SMALL, "num_key_value_heads": 1}, tie_word_embeddings=True),
}


def save_random_model(config, folder) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # spread the weights: default init gives near-uniform logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 0.15)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny_pair(request, tmp_path_factory):
    """(HF model, our model) for one tiny random-weight variant, same weights."""
    folder = save_random_model(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, load_ours(folder)


PROMPTS = {"a": [5, 17, 200], "b": [1, 2, 3, 4, 99, 120, 7], "c": list(range(30, 42))}


def check_prefill_then_decode(hf, driver: PagedDriver, prompts: dict[str, list[int]],
                              decode_steps: int) -> None:
    """Every prompt in one flat batch, then decode_steps steps decoding all of them together,
    each sequence extended by HF's greedy token; logits equal HF's at every position."""
    out = driver.step(prompts)
    seqs = {name: list(p) for name, p in prompts.items()}
    for name, tokens in seqs.items():
        torch.testing.assert_close(out[name], hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)
    for _ in range(decode_steps):
        for name in seqs:
            seqs[name].append(int(hf_logits(hf, seqs[name])[-1].argmax()))
        out = driver.step({name: tokens[-1:] for name, tokens in seqs.items()})
        for name, tokens in seqs.items():
            torch.testing.assert_close(out[name][0], hf_logits(hf, tokens)[-1], atol=ATOL,
                                       rtol=RTOL)


def check_chunked_prefill(hf, driver: PagedDriver, long_prompt: list[int], short: list[int],
                          cuts: tuple[int, int]) -> None:
    """The long prompt arrives in three chunks (split at cuts) over its own cached prefix while
    the short one prefills and then decodes beside it; logits equal HF's."""
    ref_long, ref_short = hf_logits(hf, long_prompt), hf_logits(hf, short)
    first, second = cuts
    out = driver.step({"long": long_prompt[:first], "short": short})
    torch.testing.assert_close(out["long"], ref_long[:first], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["short"], ref_short, atol=ATOL, rtol=RTOL)
    next_short = short + [int(ref_short[-1].argmax())]
    out = driver.step({"short": next_short[-1:], "long": long_prompt[first:second]})
    torch.testing.assert_close(out["long"], ref_long[first:second], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["short"][0], hf_logits(hf, next_short)[-1], atol=ATOL,
                               rtol=RTOL)
    out = driver.step({"long": long_prompt[second:]})
    torch.testing.assert_close(out["long"], ref_long[second:], atol=ATOL, rtol=RTOL)


LONG_PROMPT = [(i * 37) % 256 for i in range(23)]


def check_decode_steps(reference, driver: PagedDriver, prompts: dict[str, list[int]],
                       steps: int) -> None:
    """The prompts prefilled, then `steps` decode steps of every sequence together, each
    extended by the reference's greedy token; each step's logits equal the reference's."""
    seqs = {name: list(p) for name, p in prompts.items()}
    driver.step(seqs)
    for _ in range(steps):
        for name in seqs:
            seqs[name].append(int(hf_logits(reference, seqs[name])[-1].argmax()))
        out = driver.step({name: tokens[-1:] for name, tokens in seqs.items()})
        for name, tokens in seqs.items():
            torch.testing.assert_close(out[name][0], hf_logits(reference, tokens)[-1],
                                       atol=ATOL, rtol=RTOL)


def save_word_tokenizer(folder, vocab_size: int) -> None:
    """A word-level tokenizer over the model's vocabulary, with no EOS token: the engine needs
    one in the model folder."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)


def check_engine_greedy(folder: str, hf, prompts: list[list[int]], tokens: int = 32) -> None:
    """`tokens` greedy tokens of each prompt through the whole engine (LLM: scheduler,
    workers, batched decode, sampler) equal transformers' generate."""
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), do_sample=False,
                                max_new_tokens=tokens)[0, len(p):].tolist() for p in prompts]
    with LLM(model=folder, dtype="float32", num_threads=1, block_size=4, num_kv_blocks=64) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=tokens), use_tqdm=False)
    assert [len(e) for e in expected] == [tokens] * len(prompts)   # no early EOS
    assert [out.outputs[0].token_ids for out in outs] == expected


def test_prefill_then_batched_decode(tiny_pair):
    hf, ours = tiny_pair
    check_prefill_then_decode(hf, PagedDriver(ours), PROMPTS, decode_steps=5)


def test_chunked_prefill_over_cached_prefix(tiny_pair):
    hf, ours = tiny_pair
    # chunks of 6, 9 and 8 tokens
    check_chunked_prefill(hf, PagedDriver(ours, seed=1), LONG_PROMPT, PROMPTS["b"], (6, 15))


def test_bfloat16_runs_close_to_transformers_bfloat16(tmp_path):
    folder = save_random_model(VARIANTS["llama-gqa-untied"](), tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    driver = PagedDriver(load_ours(folder, dtype=torch.bfloat16))
    out = driver.step(PROMPTS)
    for name, tokens in PROMPTS.items():
        # bf16 keeps ~3 significant digits; logits here are O(1-10)
        torch.testing.assert_close(out[name], hf_logits(hf, tokens), atol=0.15, rtol=0.05)


def test_model_class_and_limits():
    assert get_model_class(VARIANTS["qwen2-bias-tied"]()) is LlamaForCausalLM
    assert get_model_class(LlamaConfig(architectures=["MistralForCausalLM"])) is LlamaForCausalLM
    with pytest.raises(ValueError, match="unsupported model"):
        get_model_class(transformers.GPT2Config(architectures=["GPT2LMHeadModel"]))
    # our attention has no sliding window, so a windowed model is served up to its window
    assert max_model_len(VARIANTS["mistral-head-dim"]()) == 128
    assert max_model_len(VARIANTS["qwen2-bias-tied"]()) == 256


def test_missing_weight_is_an_error(tmp_path):
    folder = save_random_model(VARIANTS["llama-gqa-untied"](), tmp_path)
    files = resolve_model(folder)
    config = load_config(files)
    weights = [(n, t) for n, t in iter_weights(files, progress=False) if "layers.1.mlp.up_proj" not in n]
    with pytest.raises(ValueError, match="missing"):
        LlamaForCausalLM(config, torch.float32).load_weights(weights)


# ---------------------------------------------------------------------------------------------
# Tensor parallel: two gloo ranks on CPU must give the single-rank logits


def _tp_worker(rank: int, folder: str, init_file: str, result_file: str):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = load_ours(folder, tp_rank=rank, tp_size=2)
        driver = PagedDriver(model)
        first = driver.step(PROMPTS)
        second = driver.step({name: [7] for name in PROMPTS})
        if rank == 0:
            torch.save({"prefill": first, "decode": second}, result_file)
    finally:
        torch.distributed.destroy_process_group()


def test_tensor_parallel_matches_single_rank(tmp_path):
    config = LlamaConfig(**{**SMALL, "intermediate_size": 128}, attention_bias=True, mlp_bias=True)
    folder = save_random_model(config, tmp_path / "model")
    result_file = str(tmp_path / "tp_result.pt")
    torch.multiprocessing.spawn(_tp_worker, args=(folder, str(tmp_path / "init"), result_file), nprocs=2)
    tp = torch.load(result_file)
    driver = PagedDriver(load_ours(folder))
    single = {"prefill": driver.step(PROMPTS), "decode": driver.step({name: [7] for name in PROMPTS})}
    for stage in ("prefill", "decode"):
        for name in PROMPTS:
            torch.testing.assert_close(tp[stage][name], single[stage][name], atol=ATOL, rtol=RTOL)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(tp["prefill"]["c"], hf_logits(hf, PROMPTS["c"]), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# The real default model: SmolLM2-135M-Instruct Q4_1 GGUF


@pytest.fixture(scope="module")
def smollm2():
    files = resolve_model(None)
    hf = AutoModelForCausalLM.from_pretrained(files.path, gguf_file=files.gguf_file,
                                              dtype=torch.float32).eval()
    tokenizer = load_tokenizer(files)
    return hf, load_ours(files.gguf_path), tokenizer


def chat_prompt(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "Write a short story about a dragon"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    hf, ours, tokenizer = smollm2
    prompt = chat_prompt(tokenizer)
    assert len(prompt) == 37
    out = PagedDriver(ours).step({"chat": prompt})["chat"]
    torch.testing.assert_close(out, hf_logits(hf, prompt), atol=1e-3, rtol=1e-4)  # seen: 6e-5


@pytest.mark.slow
def test_smollm2_greedy_decode_matches_generate(smollm2):
    hf, ours, tokenizer = smollm2
    prompt = chat_prompt(tokenizer)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
    driver = PagedDriver(ours)
    logits = driver.step({"chat": prompt})["chat"][-1]
    generated = []
    for _ in range(16):
        generated.append(int(logits.argmax()))
        logits = driver.step({"chat": generated[-1:]})["chat"][0]
    assert len(expected) == 16  # no early EOS, so all 16 are compared
    assert generated == expected
