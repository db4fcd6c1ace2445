"""Per-request caps (400 naming the limit), admission control (503 + Retry-After before the
engine sees the request), request-log truncation and key hygiene, and chat prompt_logprobs,
against one real server with small limits and an API key."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import requests

from server_utils import RemoteServer

pytestmark = pytest.mark.slow   # starts the real server with the default model

API_KEY = "sk-admission-secret-key"
MAX_NUM_SEQS, MAX_QUEUE_LEN, MAX_N = 2, 1, 3
MAX_LOG_LEN = 120
ARGS = ["--served-model-name", "smollm2", "--max-model-len", "128", "--kv-cache-memory", "64MiB",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue-len", str(MAX_QUEUE_LEN),
        "--max-n", str(MAX_N), "--max-stop-sequences", "2", "--max-stop-length", "8",
        "--max-log-len", str(MAX_LOG_LEN), "--api-keys", API_KEY]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server():
    with RemoteServer(ARGS, api_key=API_KEY) as server:
        yield server


def post(server, path: str, body: dict, headers: dict = HEADERS) -> requests.Response:
    return requests.post(server.url_for("v1", path), json={"model": "smollm2", **body},
                         headers=headers, timeout=120)


def limit_error(message: str, param: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": "limit_exceeded"}}


# ---- per-request caps ------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,expected", [
    ("completions", {"prompt": "x", "n": 4}, limit_error(
        "n is 4, but at most 3 choices are allowed per request (the server's --max-n).", "n")),
    ("chat/completions", {"messages": MESSAGES, "n": 4}, limit_error(
        "n is 4, but at most 3 choices are allowed per request (the server's --max-n).", "n")),
    ("completions", {"prompt": "x", "stop": ["a", "b", "c"]}, limit_error(
        "3 stop sequences were sent, but at most 2 are allowed (the server's "
        "--max-stop-sequences).", "stop")),
    ("chat/completions", {"messages": MESSAGES, "stop": "123456789"}, limit_error(
        "A stop sequence has 9 characters, but at most 8 are allowed (the server's "
        "--max-stop-length).", "stop")),
    ("completions", {"prompt": ["first", "second"], "n": 2}, limit_error(
        "The request needs 4 sequences, but at most 3 can be in flight (the server's "
        "--max-num-seqs + --max-queue-len).", "prompt")),
    ("chat/completions", {"messages": MESSAGES, "prompt_logprobs": 21}, {"error": {
        "message": "prompt_logprobs: must be <= 20", "type": "invalid_request_error",
        "param": "prompt_logprobs", "code": None}}),
])
def test_requests_beyond_a_cap_get_400_naming_it(server, path, body, expected):
    r = post(server, path, body)
    assert (r.status_code, r.json()) == (400, expected)


def test_requests_at_the_caps_are_served(server):
    r = post(server, "completions", {"prompt": "Once", "n": MAX_N, "max_tokens": 2,
                                     "stop": ["12345678", "\n"]})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == MAX_N


# ---- admission control -----------------------------------------------------------------------

def engine_load(server) -> float:
    return (server.metric("aphrodite:num_requests_running")
            + server.metric("aphrodite:num_requests_waiting"))


def test_full_queue_gets_503_with_retry_after_before_reaching_the_engine(server):
    """Two running and one waiting fill --max-num-seqs 2 + --max-queue-len 1: the next request
    is refused at once, is never queued, and the slots come back when the streams close."""
    long_stream = {"model": "smollm2", "prompt": "Write a long story.", "max_tokens": 100,
                   "ignore_eos": True, "stream": True}
    url = server.url_for("v1", "completions")

    async def scenario():
        async with aiohttp.ClientSession(headers=HEADERS) as session:
            streams = [await session.post(url, json=long_stream)
                       for _ in range(MAX_NUM_SEQS + MAX_QUEUE_LEN)]
            # A streaming response's status arrives once its request is registered.
            assert [s.status for s in streams] == [200] * len(streams)
            async with session.post(url, json={**long_stream, "stream": False}) as refused:
                body, retry_after = await refused.json(), refused.headers.get("Retry-After")
                status = refused.status
            # The refused request never reached the engine: it holds exactly the three.
            deadline = time.monotonic() + 30
            while engine_load(server) != len(streams) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            load = engine_load(server)
            for s in streams:
                s.close()    # hang up: the server aborts them
            return status, body, retry_after, load

    status, body, retry_after, load = asyncio.run(scenario())
    assert (status, retry_after) == (503, "1")
    assert body == {"error": {
        "message": "The server is overloaded: admitting 1 more sequence(s) would leave 2 "
                   "waiting for a batch slot, but the queue holds 1 (--max-queue-len). "
                   "Retry after 1 s.",
        "type": "server_overloaded", "param": None, "code": "server_overloaded"}}
    assert load == MAX_NUM_SEQS + MAX_QUEUE_LEN
    # Once the aborted streams are gone, a request needing every slot is admitted again.
    deadline = time.monotonic() + 30
    while True:
        r = post(server, "completions", {"prompt": "Hi", "n": MAX_N, "max_tokens": 2})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text


# ---- logs ------------------------------------------------------------------------------------

def test_request_log_lines_are_cut_and_keys_never_logged(server):
    bias = {str(token): -1.0 for token in range(100, 140)}     # a long params summary
    r = post(server, "chat/completions", {"messages": MESSAGES, "max_tokens": 1,
                                          "logit_bias": bias})
    assert r.status_code == 200, r.text
    request_id = r.json()["id"]
    line = server.wait_for_log(f"Received request {request_id}", timeout_s=10)
    message = line[line.index("Received request"):]
    kept, _, rest = message.partition("... [")
    assert len(kept) == MAX_LOG_LEN and rest.endswith(" more characters]")
    assert "'logit_bias'" in kept
    wrong = post(server, "completions", {"prompt": "x"},
                 headers={"Authorization": "Bearer sk-wrong-key-in-the-log?"})
    assert wrong.status_code == 401
    log = "\n".join(server.log)
    assert API_KEY not in log and "sk-wrong-key-in-the-log" not in log


# ---- chat prompt_logprobs --------------------------------------------------------------------

def test_chat_prompt_logprobs_equal_those_of_the_same_tokens_as_a_completion(server):
    """Completions' prompt_logprobs are checked against transformers (test_prompt_logprobs.py);
    chat must give the same for the prompt its template renders."""
    ids = post(server, "tokenize", {"messages": MESSAGES}).json()["tokens"]
    reference = post(server, "completions", {"prompt": ids, "max_tokens": 1,
                                             "prompt_logprobs": 2}).json()
    reference = reference["choices"][0]["prompt_logprobs"]
    chat = post(server, "chat/completions", {"messages": MESSAGES, "max_tokens": 1,
                                             "prompt_logprobs": 2}).json()
    assert "prompt_logprobs" not in chat["choices"][0]
    assert len(chat["prompt_logprobs"]) == len(ids) and chat["prompt_logprobs"][0] is None
    assert_same_prompt_logprobs(chat["prompt_logprobs"], reference)

    streamed = []
    with requests.post(server.url_for("v1", "chat/completions"), headers=HEADERS, stream=True,
                       timeout=120, json={"model": "smollm2", "messages": MESSAGES,
                                          "max_tokens": 3, "prompt_logprobs": 2,
                                          "stream": True}) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "prompt_logprobs" in chunk:
                    streamed.append(chunk["prompt_logprobs"])
    assert len(streamed) == 1          # sent once, in the first chunk that has them
    assert_same_prompt_logprobs(streamed[0], reference)
    plain = post(server, "chat/completions", {"messages": MESSAGES, "max_tokens": 1}).json()
    assert plain["prompt_logprobs"] is None      # vLLM's field, null unless asked


def assert_same_prompt_logprobs(got: list, expected: list) -> None:
    assert len(got) == len(expected) and got[0] is None and expected[0] is None
    for g, e in zip(got[1:], expected[1:]):
        assert set(g) == set(e)
        for token, entry in g.items():
            assert entry["rank"] == e[token]["rank"]
            assert entry["decoded_token"] == e[token]["decoded_token"]
            assert entry["logprob"] == pytest.approx(e[token]["logprob"], abs=1e-4)
