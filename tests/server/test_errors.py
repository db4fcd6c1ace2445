"""Error responses, tokenize/detokenize, models, version, samplers and /metrics end to end."""

from __future__ import annotations

import threading

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from aphrodite.model_files import load_tokenizer, resolve_model
from server_utils import E2E_MAX_MODEL_LEN, SEED_MODEL_NAME, shared_server

pytestmark = pytest.mark.slow   # starts the real server with the default model

MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server():
    return shared_server()


def post(server, path: str, **kwargs) -> requests.Response:
    return requests.post(server.url_for("v1", path), timeout=120, **kwargs)


def assert_error(r: requests.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "any":
        assert error["param"] == param
    return error


@pytest.mark.parametrize("body,param", [
    ({"messages": MESSAGES, "temperature": -0.5}, "temperature"),
    ({"messages": MESSAGES, "top_p": 1.5}, "top_p"),
    ({"messages": MESSAGES, "n": 0}, "n"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": MESSAGES, "min_p": 2}, "min_p"),
    ({"messages": MESSAGES, "top_k": -2}, "top_k"),
    ({"messages": MESSAGES, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 100}, "top_logprobs"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": MESSAGES, "logit_bias": {"49152": 1}}, "logit_bias"),
    ({"messages": MESSAGES, "stop": ["ok", ""]}, "stop"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": MESSAGES, "temperature": "warm"}, "temperature"),
    ({"messages": "Hello"}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.type"),
    ({}, "messages"),
])
def test_bad_chat_requests_are_400(server, body, param):
    assert_error(post(server, "chat/completions", json={"model": "smollm2", **body}), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": [1, 2, 49152]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
])
def test_bad_completion_requests_are_400(server, body, param):
    assert_error(post(server, "completions", json={"model": "smollm2", **body}), 400, param)


def test_invalid_json_is_400(server):
    r = post(server, "chat/completions", data=b'{"model": "smollm2", "messages": [',
             headers={"Content-Type": "application/json"})
    assert assert_error(r, 400)["code"] == "invalid_json"


def test_prompt_longer_than_context_is_400_with_both_lengths(server):
    prompt = "word " * 400
    r = post(server, "completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": 5})
    error = assert_error(r, 400, "prompt")
    count = post(server, "tokenize", json={"prompt": prompt}).json()["count"]
    assert str(E2E_MAX_MODEL_LEN) in error["message"] and str(count) in error["message"]


def test_unknown_model_is_404(server):
    error = assert_error(post(server, "chat/completions", json={
        "model": "gpt-4", "messages": MESSAGES}), 404, "model")
    assert "gpt-4" in error["message"]
    assert_error(requests.get(server.url_for("v1", "models", "no/such-model"), timeout=10), 404)
    with pytest.raises(openai.NotFoundError):
        server.get_client().completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_oversized_body_is_413(server):
    r = post(server, "completions", json={"model": "smollm2", "prompt": "x" * 300_000})
    assert assert_error(r, 413)["code"] == "request_too_large"


def test_unknown_route_is_404_json(server):
    assert_error(requests.get(server.url_for("v1", "nothing-here"), timeout=10), 404)


def test_bad_requests_do_not_disturb_a_running_stream(server):
    client = server.get_client()
    text = []

    def stream():
        for chunk in client.completions.create(model="smollm2", prompt="Tell me about rivers",
                                               max_tokens=12, temperature=0, stream=True):
            text.append(chunk.choices[0].text)

    thread = threading.Thread(target=stream)
    thread.start()
    for _ in range(5):
        assert post(server, "completions", data=b"{oops").status_code == 400
        assert post(server, "completions", json={"model": "smollm2", "prompt": "x",
                                                 "temperature": -1}).status_code == 400
    thread.join(300)
    reference = client.completions.create(model="smollm2", prompt="Tell me about rivers",
                                          max_tokens=12, temperature=0).choices[0].text
    assert "".join(text) == reference


def test_tokenize_detokenize_round_trip(server):
    tokenizer = load_tokenizer(resolve_model(None))
    text = "Héllo wörld 🐉, tokens!"
    r = post(server, "tokenize", json={"model": "smollm2", "prompt": text}).json()
    assert r["tokens"] == tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == E2E_MAX_MODEL_LEN
    back = post(server, "detokenize", json={"model": "smollm2", "tokens": r["tokens"]}).json()
    assert back == {"prompt": text}
    chat = post(server, "tokenize", json={"messages": MESSAGES}).json()
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    assert_error(post(server, "detokenize", json={"tokens": [-1]}), 400, "tokens")


def test_models_version_and_samplers(server):
    models = requests.get(server.url_for("v1", "models"), timeout=10).json()
    assert [m["id"] for m in models["data"]] == [SEED_MODEL_NAME, "smollm2"]
    card = requests.get(server.url_for("v1", "models", SEED_MODEL_NAME), timeout=10).json()
    assert card["id"] == SEED_MODEL_NAME and card["max_model_len"] == E2E_MAX_MODEL_LEN
    version = requests.get(server.url_for("version"), timeout=10).json()
    import aphrodite
    assert version == {"version": aphrodite.__version__}
    samplers = requests.get(server.url_for("v1", "samplers"), timeout=10).json()["data"]
    names = {s["name"] for s in samplers}
    assert {"temperature", "top_k", "min_p", "dry_multiplier", "xtc_probability"} <= names


def test_metrics_exposition(server):
    client = server.get_client()
    before = server.metric("aphrodite:generation_tokens_total", model_name=SEED_MODEL_NAME)
    r = client.completions.create(model="smollm2", prompt="Metrics", max_tokens=3, temperature=0)
    text = requests.get(server.url_for("metrics"), timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("aphrodite:num_requests_running", "aphrodite:num_requests_waiting",
                 "aphrodite:kv_cache_usage_perc", "aphrodite:prompt_tokens",
                 "aphrodite:generation_tokens", "aphrodite:time_to_first_token_seconds",
                 "aphrodite:time_per_output_token_seconds", "aphrodite:e2e_request_latency_seconds"):
        assert name in families, name
        assert all(s.labels.get("model_name") == SEED_MODEL_NAME for s in families[name].samples)
    after = server.metric("aphrodite:generation_tokens_total", model_name=SEED_MODEL_NAME)
    assert after - before == r.usage.completion_tokens == 3
    assert server.metric("aphrodite:e2e_request_latency_seconds_count") >= 1
