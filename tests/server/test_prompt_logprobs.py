"""Prompt logprobs end to end: scheduler, engine (offline LLM) and /v1/completions.

Reference: transformers' float32 log_softmax of the default model's logits over the whole
prompt (the GGUF dequantised to float32). Our float32 forward matches its logits to ~1e-5
(tests/test_models.py); logprobs are compared at abs 1e-3.
"""

from __future__ import annotations

import json

import pytest
import requests
import torch

from aphrodite import LLM, SamplingParams
from aphrodite.core.kv_cache_manager import KVCacheManager
from aphrodite.core.request import Request
from aphrodite.core.scheduler import Scheduler
from server_utils import shared_server

TOL = 1e-3
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. One, two, three, four, five, six, seven,",
    "Water boils at",
    "In 1969 the first people walked on the Moon; the mission was called",
]


# ---- scheduler: no prefix-cache hits for requests that want prompt logprobs ----------------

def test_prompt_logprob_requests_skip_the_prefix_cache():
    sched = Scheduler(KVCacheManager(64, 4), 8, 64, 256)
    shared = list(range(40, 60))

    def run(rid, params):
        req = Request(request_id=rid, prompt_token_ids=shared + [len(rid)], sampling_params=params,
                      max_tokens=1)
        sched.add_request(req)
        first = sched.schedule()
        sched.update_from_output(first, {rid: 7})
        return req, first.num_scheduled_tokens[rid]

    run("warm", {})
    cached, scheduled = run("cached", {})
    assert cached.num_cached_tokens == 20 and scheduled == 1
    full, scheduled = run("wants-prompt-logprobs", {"prompt_logprobs": 0})
    assert full.num_cached_tokens == 0 and scheduled == 21
    assert sched.kv.prefix_queries == 42          # the skipped request made no lookup


# ---- offline engine --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(files, prompt_ids):
    """transformers' log_softmax [len, V] of each prompt (row q predicts token q + 1)."""
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(files.path, gguf_file=files.gguf_file,
                                                 dtype=torch.float32).eval()
    with torch.inference_mode():
        refs = [model(torch.tensor([ids])).logits[0].float().log_softmax(-1) for ids in prompt_ids]
    del model
    return refs


def check_entry(entry: dict, ref_row: torch.Tensor, token_id: int, top_n: int) -> None:
    """One engine entry (token_id, logprob, rank, top_token_ids, top_logprobs) against the
    reference log_softmax row that predicts token_id."""
    ref = ref_row[token_id].item()
    assert entry["token_id"] == token_id
    assert entry["logprob"] == pytest.approx(ref, abs=TOL)
    # Rank within what the tolerance allows for near-ties.
    assert int((ref_row > ref + TOL).sum()) + 1 <= entry["rank"] \
        <= int((ref_row > ref - TOL).sum()) + 1
    assert len(entry["top_token_ids"]) == top_n
    expected_top = ref_row.topk(top_n).values.tolist()
    assert entry["top_logprobs"] == pytest.approx(expected_top, abs=TOL)
    for t, lp in zip(entry["top_token_ids"], entry["top_logprobs"]):
        assert ref_row[t].item() == pytest.approx(lp, abs=TOL)


def check_prompt_logprobs(out, ids, ref, top_n):
    assert out.prompt_token_ids == ids
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        check_entry(out.prompt_logprobs[p], ref[p - 1], ids[p], top_n)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [2048, 7])   # 7: prompts span several prefill chunks
def test_offline_prompt_logprobs_match_transformers(budget, prompt_ids, reference):
    params = [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=n) for n in (3, 0, 5)]
    with LLM(num_threads=1, max_num_batched_tokens=budget) as llm:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params,
                            use_tqdm=False)
        # Again: the prompts' blocks are now in the prefix cache, which must not be used.
        again = llm.generate([{"prompt_token_ids": prompt_ids[0]}], params[0], use_tqdm=False)[0]
        plain = llm.generate([{"prompt_token_ids": prompt_ids[0]}],
                             SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    for out, ids, ref, p in zip(outs, prompt_ids, reference, params):
        check_prompt_logprobs(out, ids, ref, p.prompt_logprobs)
        # The first generated token is greedy: the argmax after the last prompt token.
        assert out.outputs[0].token_ids[0] == int(ref[-1].argmax())
    check_prompt_logprobs(again, prompt_ids[0], reference[0], 3)
    assert again.num_cached_tokens == 0
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0


# ---- HTTP ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    return shared_server()


def complete(server, **body):
    r = requests.post(server.url_for("v1", "completions"), timeout=300,
                      json={"model": "smollm2", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_echo_with_logprobs_returns_prompt_logprobs(server, tokenizer, prompt_ids, reference):
    prompt, ids, ref = PROMPTS[0], prompt_ids[0], reference[0]
    echoed = complete(server, prompt=prompt, max_tokens=3, logprobs=2, echo=True)["choices"][0]
    plain = complete(server, prompt=prompt, max_tokens=3, logprobs=2)["choices"][0]
    lp, n = echoed["logprobs"], len(ids)
    assert echoed["text"] == prompt + plain["text"]
    assert lp["tokens"][:n] == [tokenizer.decode([t]) for t in ids]
    assert lp["tokens"][n:] == plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for p in range(1, n):
        assert lp["token_logprobs"][p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=TOL)
        # The prompt token and the top 2 alternatives (OpenAI's legacy API and vLLM).
        wanted = {ids[p], *ref[p - 1].topk(2).indices.tolist()}
        assert lp["top_logprobs"][p] == pytest.approx(
            {tokenizer.decode([t]): ref[p - 1, t].item() for t in wanted}, abs=TOL)
    assert lp["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-4)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i])
                                 for i in range(len(lp["tokens"]))]


@pytest.mark.slow
def test_streamed_echo_with_logprobs_matches_the_whole_response(server, prompt_ids):
    whole = complete(server, prompt=PROMPTS[1], max_tokens=3, logprobs=1, echo=True)
    with requests.post(server.url_for("v1", "completions"), stream=True, timeout=300, json={
            "model": "smollm2", "prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0,
            "logprobs": 1, "echo": True, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]
    tokens, values = [], []
    for event in events:
        block = event["choices"][0]["logprobs"]
        if block:
            tokens += block["tokens"]
            values += block["token_logprobs"]
    expected = whole["choices"][0]["logprobs"]
    assert tokens == expected["tokens"] and len(tokens) == len(prompt_ids[1]) + 3
    assert values[0] is None and values[1:] == pytest.approx(expected["token_logprobs"][1:],
                                                              abs=1e-4)


@pytest.mark.slow
def test_prompt_logprobs_extension_field(server, prompt_ids, reference):
    ids, ref = prompt_ids[2], reference[2]
    choice = complete(server, prompt=ids, max_tokens=1, prompt_logprobs=2)["choices"][0]
    field = choice["prompt_logprobs"]
    assert len(field) == len(ids) and field[0] is None
    for p in range(1, len(ids)):
        row = ref[p - 1]
        entries = {int(t): v for t, v in field[p].items()}
        top = row.topk(2).indices.tolist()
        assert set(entries) == {ids[p], *top}
        for t, v in entries.items():
            assert v["logprob"] == pytest.approx(row[t].item(), abs=TOL)
        assert entries[top[0]]["rank"] == 1
    assert choice["logprobs"] is None         # only the prompt's were asked for
    r = requests.post(server.url_for("v1", "completions"), timeout=60, json={
        "model": "smollm2", "prompt": "x", "max_tokens": 1, "prompt_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
