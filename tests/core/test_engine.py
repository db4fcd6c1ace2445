"""The whole engine (frontend -> engine core -> worker processes) on the real default model.

Reference: transformers' greedy generation of the same GGUF, dequantised to float32.
"""

import os
import signal
import threading
import time

import pytest

from aphrodite import LLM, SamplingParams
from aphrodite.frontend.engine_process import EngineDeadError, EngineStartError

pytestmark = pytest.mark.slow

CHATS = [
    "Write a short story about a dragon",
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain photosynthesis to a child.",
]
QUESTIONS = CHATS + [
    "Name a famous painter.", "How do airplanes fly?", "Write a haiku about rain.",
    "What is 12 times 7?", "Describe the color blue.", "Why is the sky dark at night?",
    "Tell me a joke about cats.", "What is a prime number?", "Suggest a name for a dog.",
    "How many legs does a spider have?", "What does a compiler do?", "Translate 'hello' to French.",
]


def chat_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def hf_greedy(files, tokenizer):
    """transformers' greedy continuations (64 tokens) of the CHATS prompts."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(files.path, gguf_file=files.gguf_file,
                                                 dtype=torch.float32).eval()
    refs = []
    with torch.inference_mode():
        for question in CHATS:
            ids = chat_ids(tokenizer, question)
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64,
                                 pad_token_id=tokenizer.eos_token_id)
            refs.append(out[0, len(ids):].tolist())
    del model
    torch.set_num_threads(1)
    return refs


@pytest.fixture(scope="module")
def llm():
    engine = LLM(num_threads=2)
    yield engine
    engine.shutdown()


GREEDY = SamplingParams(temperature=0, max_tokens=64)


def test_greedy_matches_transformers_token_for_token(llm, tokenizer, hf_greedy):
    outs = llm.generate([{"prompt_token_ids": chat_ids(tokenizer, q)} for q in CHATS], GREEDY,
                        use_tqdm=False)
    for question, out, ref in zip(CHATS, outs, hf_greedy):
        assert out.outputs[0].token_ids == ref, question
        assert out.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)


def test_chat_api_applies_the_template(llm, tokenizer, hf_greedy):
    out = llm.chat([{"role": "user", "content": CHATS[0]}], GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == chat_ids(tokenizer, CHATS[0])
    assert out.outputs[0].token_ids == hf_greedy[0]


def test_float16_kv_cache(tokenizer, hf_greedy):
    """kv_cache_dtype float16: twice the blocks in the same memory, and greedy output that only
    rounding can move from transformers' (all 200 equal when written)."""
    import torch
    from aphrodite.executor.layers.attention import kv_cache_bytes_per_block
    from aphrodite.model_files import load_config, resolve_model
    budget = 64 << 20
    with LLM(num_threads=2, kv_cache_memory=budget, kv_cache_dtype="float16") as engine:
        outs = engine.generate([{"prompt_token_ids": chat_ids(tokenizer, q)} for q in CHATS],
                               GREEDY, use_tqdm=False)
        blocks = engine.engine.ready.num_kv_blocks
    config = load_config(resolve_model(None))    # SmolLM2-135M: 30 layers, 3 kv heads of 64
    float32_block = kv_cache_bytes_per_block(config.num_hidden_layers, 16,
                                             config.num_key_value_heads, 64, torch.float32)
    assert blocks == budget // (float32_block // 2)
    tokens = [out.outputs[0].token_ids for out in outs]
    agree = sum(a == b for ours, ref in zip(tokens, hf_greedy) for a, b in zip(ours, ref))
    assert agree >= 0.9 * sum(map(len, hf_greedy)), (tokens, hf_greedy)


def _greedy_alone_and_together(engine, prompts, params):
    together = engine.generate(prompts, params, use_tqdm=False)
    alone = [engine.generate([p], params, use_tqdm=False)[0] for p in prompts]
    return ([o.outputs[0].token_ids for o in together], [o.outputs[0].token_ids for o in alone])


BATCH_PARAMS = SamplingParams(temperature=0, max_tokens=32)


@pytest.fixture(scope="module")
def batch_prompts(tokenizer):
    return [{"prompt_token_ids": chat_ids(tokenizer, q)} for q in QUESTIONS]


@pytest.fixture(scope="module")
def alone_reference(llm, batch_prompts):
    together, alone = _greedy_alone_and_together(llm, batch_prompts, BATCH_PARAMS)
    return together, alone


def test_batch_invariance(alone_reference):
    together, alone = alone_reference
    assert together == alone


def test_batch_invariance_under_chunked_prefill(batch_prompts, alone_reference):
    # A 16-token budget splits every ~30-token prompt into chunks, mixed with decodes.
    with LLM(num_threads=2, max_num_batched_tokens=16) as engine:
        outs = engine.generate(batch_prompts, BATCH_PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone_reference[1]


def test_batch_invariance_under_preemption(batch_prompts, alone_reference):
    # 12 blocks of 16 tokens hold ~3 of the 16 requests at their full length.
    with LLM(num_threads=2, num_kv_blocks=12, enable_prefix_caching=False) as engine:
        outs = engine.generate(batch_prompts, BATCH_PARAMS, use_tqdm=False)
        assert engine.last_stats.num_preemptions > 0
        assert engine.last_stats.kv_cache_usage == 0.0
    assert all(o.finished for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == alone_reference[1]


def test_prefix_caching_reuses_a_shared_prefix(llm, tokenizer):
    system = ("You are a meticulous assistant for a library. " * 12).strip()
    def prompt(q):
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": q}],
            tokenize=False, add_generation_prompt=True)
        return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
    params = SamplingParams(temperature=0, max_tokens=24)
    # Same engine with the cache reset would need a utility call; a fresh question works:
    first = llm.generate([prompt("Where are the atlases?")], params, use_tqdm=False)[0]
    hits_before = llm.last_stats.prefix_cache_hits
    second = llm.generate([prompt("When do you close?")], params, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 96                # the long shared system prompt
    assert llm.last_stats.prefix_cache_hits - hits_before == second.num_cached_tokens
    with LLM(num_threads=2, enable_prefix_caching=False) as cold:
        reference = cold.generate([prompt("When do you close?")], params, use_tqdm=False)[0]
        assert reference.num_cached_tokens == 0
    assert second.outputs[0].token_ids == reference.outputs[0].token_ids
    assert first.num_cached_tokens < second.num_cached_tokens


def test_killed_worker_fails_generate_quickly(tokenizer):
    engine = LLM(num_threads=1)
    core = engine.engine.proc
    worker = engine.engine.ready.worker_pids[0]
    threading.Timer(1.0, os.kill, (worker, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="worker"):
        engine.generate([{"prompt_token_ids": chat_ids(tokenizer, q)} for q in QUESTIONS],
                        SamplingParams(temperature=0, max_tokens=400, ignore_eos=True),
                        use_tqdm=False)
    assert time.monotonic() - start < 10
    with pytest.raises(EngineDeadError):
        engine.generate(["again"], GREEDY, use_tqdm=False)
    core.join(5)
    assert core.exitcode == 1            # the engine core reported the failure and exited
    engine.shutdown()


def test_worker_that_fails_to_load_fails_start_quickly(tokenizer, tmp_path):
    # The core reports the worker's error and exits; the caller must not then block on a
    # SHUTDOWN frame to a socket nobody reads (seen hanging LLM() for minutes on a GPU box).
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    start = time.monotonic()
    for _ in range(3):     # the race between the core's exit and our SHUTDOWN differs per run
        with pytest.raises(EngineStartError, match="(?s)worker failed to start.*SafetensorError"):
            LLM(str(tmp_path), num_threads=1)
    assert time.monotonic() - start < 60
