"""Details that clients written for vLLM rely on, and the server options a newcomer meets
first (--default-max-tokens, --max-logprobs -1), against one real server."""

from __future__ import annotations

import json

import pytest
import requests

from server_utils import E2E_SERVER_ARGS, shared_server

pytestmark = pytest.mark.slow   # starts the real server with the default model

DEFAULT_MAX_TOKENS = 5
ARGS = [*E2E_SERVER_ARGS, "--default-max-tokens", str(DEFAULT_MAX_TOKENS), "--max-logprobs", "-1"]
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "The colour I like most is"}]


@pytest.fixture(scope="module")
def server():
    return shared_server(ARGS)


def post(server, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(server.url_for(*path.split("/")), json=body, timeout=120, **kwargs)


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def test_logprobs_zero_names_the_sampled_token(server):
    choice = ok(post(server, "v1/completions", {"prompt": PROMPT, "max_tokens": 4,
                                               "temperature": 1.0, "seed": 3,
                                               "logprobs": 0}))["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 4
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top == {token: logprob}


def test_top_logprobs_hold_the_sampled_token_and_at_most_k_plus_one(server):
    k = 2
    choice = ok(post(server, "v1/completions", {"prompt": PROMPT, "max_tokens": 6,
                                               "temperature": 1.5, "seed": 5,
                                               "logprobs": k}))["choices"][0]
    lp = choice["logprobs"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == logprob
        others = [v for t, v in top.items() if t != token]
        if len(top) == k + 1:      # the sampled token is not among the k best: it comes extra
            assert logprob <= min(others) + 1e-6
        else:
            assert len(top) == k


def test_max_logprobs_minus_one_has_no_cap(server):
    choice = ok(post(server, "v1/completions", {"prompt": PROMPT, "max_tokens": 1,
                                               "temperature": 0, "logprobs": 40}))["choices"][0]
    assert len(choice["logprobs"]["top_logprobs"][0]) >= 40
    chat = ok(post(server, "v1/chat/completions", {"messages": MESSAGES[:1], "max_tokens": 1,
                                                  "logprobs": True, "top_logprobs": 30}))
    assert len(chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 30


def test_default_max_tokens_applies_only_when_omitted(server):
    body = {"messages": MESSAGES[:1], "ignore_eos": True, "temperature": 0}
    assert ok(post(server, "v1/chat/completions", body))["usage"]["completion_tokens"] == \
        DEFAULT_MAX_TOKENS
    assert ok(post(server, "v1/chat/completions", {**body, "max_tokens": 7}))["usage"][
        "completion_tokens"] == 7
    plain = {"prompt": PROMPT, "ignore_eos": True}
    assert ok(post(server, "v1/completions", plain))["usage"]["completion_tokens"] == \
        DEFAULT_MAX_TOKENS
    assert ok(post(server, "v1/completions", {**plain, "max_tokens": 2}))["usage"][
        "completion_tokens"] == 2


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_body_that_is_not_declared_json_gets_415(server, content_type):
    r = requests.post(server.url_for("v1", "completions"), timeout=60,
                      data=json.dumps({"prompt": PROMPT, "max_tokens": 1}),
                      headers={"Content-Type": content_type})
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    fine = requests.post(server.url_for("v1", "completions"), timeout=60,
                         data=json.dumps({"prompt": PROMPT, "max_tokens": 1}),
                         headers={"Content-Type": "application/json; charset=utf-8"})
    assert fine.status_code == 200, fine.text


def test_tokenize_and_detokenize_at_the_root(server, tokenizer):
    ids = tokenizer.encode("Hello wörld")
    v1 = ok(post(server, "v1/tokenize", {"prompt": "Hello wörld"}))
    root = ok(post(server, "tokenize", {"prompt": "Hello wörld", "return_token_strs": True}))
    assert root["tokens"] == v1["tokens"] == ids and v1["token_strs"] is None
    assert root["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    assert ok(post(server, "detokenize", {"tokens": ids}))["prompt"] == tokenizer.decode(ids)


def _chat(server, **extra) -> dict:
    return ok(post(server, "v1/chat/completions", {
        "messages": MESSAGES, "add_generation_prompt": False, "continue_final_message": True,
        "max_tokens": 6, "temperature": 0, **extra}))


def test_chat_echo_prepends_the_continued_message(server):
    plain = _chat(server)["choices"][0]["message"]["content"]
    echoed = _chat(server, echo=True)["choices"][0]["message"]["content"]
    assert echoed == MESSAGES[-1]["content"] + plain
    r = post(server, "v1/chat/completions", {
        "messages": MESSAGES, "add_generation_prompt": False, "continue_final_message": True,
        "max_tokens": 6, "temperature": 0, "echo": True, "stream": True}, stream=True)
    text = ""
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    assert text == echoed


def test_vllm_null_fields_are_present_and_filled_when_asked(server, tokenizer):
    chat = _chat(server)
    assert chat["prompt_logprobs"] is None and chat["prompt_token_ids"] is None
    assert chat["choices"][0]["token_ids"] is None
    asked = _chat(server, return_token_ids=True)
    ids = asked["choices"][0]["token_ids"]
    assert len(ids) == asked["usage"]["completion_tokens"]
    assert tokenizer.decode(ids) == asked["choices"][0]["message"]["content"]
    assert len(asked["prompt_token_ids"]) == asked["usage"]["prompt_tokens"]
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    choice = ok(post(server, "v1/completions", body))["choices"][0]
    assert {k: choice[k] for k in ("prompt_logprobs", "prompt_token_ids", "token_ids")} == \
        {"prompt_logprobs": None, "prompt_token_ids": None, "token_ids": None}
    choice = ok(post(server, "v1/completions", {**body, "return_token_ids": True}))["choices"][0]
    assert choice["prompt_token_ids"] == ok(post(server, "tokenize", {"prompt": PROMPT}))["tokens"]
    assert tokenizer.decode(choice["token_ids"]) == choice["text"]


def test_vllm_metric_families(server):
    def tpot_count() -> float:
        return server.metric("aphrodite:time_per_output_token_seconds_count")

    before = tpot_count()
    usage = ok(post(server, "v1/completions", {"prompt": PROMPT, "max_tokens": 3, "n": 2,
                                              "ignore_eos": True}))["usage"]
    # One observation per output token after the first of each sequence (vLLM's count).
    assert tpot_count() - before == usage["completion_tokens"] - 2
    for family in ("iteration_tokens_total_count", "request_params_n_count",
                   "request_params_max_tokens_count", "request_decode_time_seconds_count",
                   "request_queue_time_seconds_count", "request_prefill_time_seconds_count",
                   "request_inference_time_seconds_count"):
        assert server.metric(f"aphrodite:{family}") > 0, family
    # Each finished sequence that reached a batch: queue + inference time fit in its e2e time.
    spent = sum(server.metric(f"aphrodite:request_{name}_time_seconds_sum")
                for name in ("queue", "inference"))
    assert 0 < spent <= server.metric("aphrodite:e2e_request_latency_seconds_sum") + 1e-6
    assert server.metric("aphrodite:request_params_n_sum") >= 2
    assert server.metric("aphrodite:cache_config_info", block_size="16",
                         enable_prefix_caching="True") == 1


def test_ready_line_gives_the_playground_url(server):
    line = server.wait_for_log("Serving ", timeout_s=5)
    assert f"open http://127.0.0.1:{server.port}/ in a browser" in line
