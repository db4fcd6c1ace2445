"""OpenAI semantics end to end: SDK (sync, async, streaming) and the raw wire format.

References are independent of the server's own code paths: greedy text obtained without
a stop string is the reference for stop-string truncation; the tokenizer loaded here is
the reference for token counts; a single n=1 request with seed s+i is the reference for
choice i of an n>1 request with seed s.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import requests

from aphrodite.model_files import load_tokenizer, resolve_model
from server_utils import E2E_MAX_MODEL_LEN, SEED_MODEL_NAME, shared_server

pytestmark = pytest.mark.slow   # starts the real server with the default model

MESSAGES = [{"role": "user", "content": "List three colours."}]


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return server.get_client()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


def sse_events(response: requests.Response) -> list:
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line   # nothing but data lines and blank separators
    return events


def test_chat_wire_format_and_usage(server, tokenizer):
    r = requests.post(server.url_for("v1", "chat", "completions"), timeout=300, json={
        "model": "smollm2", "messages": MESSAGES, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "smollm2"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        len(prompt_ids), 5, len(prompt_ids) + 5)
    # Prefix-cache hits are reported OpenAI-style, in whole KV blocks of the prompt.
    cached = usage.get("prompt_tokens_details", {"cached_tokens": 0})["cached_tokens"]
    assert 0 <= cached < len(prompt_ids) and cached % 16 == 0
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]


def test_chat_stream_wire_format(server):
    with requests.post(server.url_for("v1", "chat", "completions"), stream=True, timeout=300,
                       json={"model": SEED_MODEL_NAME, "messages": MESSAGES, "max_tokens": 6,
                             "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])
    finals = [c for c in chunks[:-1] if c["choices"][0]["finish_reason"] is not None]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"


def test_stream_and_non_stream_give_the_same_text(client):
    kwargs = dict(model=SEED_MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0.9,
                  seed=1234)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(stream=True, **kwargs)
                       if chunk.choices)
    assert streamed == full and full


def test_completion_stream_matches_non_stream(client):
    kwargs = dict(model="smollm2", prompt="The history of the bicycle", max_tokens=20,
                  temperature=1.0, seed=7)
    full = client.completions.create(**kwargs)
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == full.choices[0].text


def _greedy_completion(client, prompt: str, max_tokens: int) -> str:
    return client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens,
                                     temperature=0).choices[0].text


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_with_streaming_hold_back(client, include):
    prompt = "Here is a list of fruits: apples, bananas,"
    reference = _greedy_completion(client, prompt, 16)
    stop = reference[8:12]           # a 4-character stop string from the middle
    cut = reference.index(stop) + (len(stop) if include else 0)
    extra = {"include_stop_str_in_output": include}
    full = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16,
                                     temperature=0, stop=[stop, "\u2603never"], extra_body=extra)
    assert full.choices[0].text == reference[:cut]
    assert full.choices[0].finish_reason == "stop"
    assert full.choices[0].model_extra["stop_reason"] == stop
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=16,
                                            temperature=0, stop=stop, stream=True,
                                            extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks) == reference[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_follow_consecutive_seeds(client):
    kwargs = dict(model="smollm2", messages=MESSAGES, max_tokens=8, temperature=1.0)
    both = client.chat.completions.create(n=2, seed=100, **kwargs)
    assert [c.index for c in both.choices] == [0, 1]
    singles = [client.chat.completions.create(seed=100 + i, **kwargs) for i in range(2)]
    for choice, single in zip(both.choices, singles):
        assert choice.message.content == single.choices[0].message.content
    assert both.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert both.usage.prompt_tokens == singles[0].usage.prompt_tokens


def test_chat_logprobs(client):
    response = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=6,
                                              temperature=0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(values[0], abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == response.choices[0].message.content


def test_completion_logprobs_and_echo(client):
    prompt = "One, two, three,"
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=5, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-4)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    echoed = client.completions.create(model="smollm2", prompt=prompt, max_tokens=5,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text


def test_completion_batch_of_prompts_and_token_ids(client, tokenizer):
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in ("The sky is", "Water is")]
    r = client.completions.create(model="smollm2", prompt=ids, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    single = _greedy_completion(client, "Water is", 4)
    assert r.choices[2].text == r.choices[3].text == single
    assert r.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    texts = client.completions.create(model="smollm2", prompt=["The sky is", "Water is"],
                                      max_tokens=4, temperature=0)
    assert [c.text for c in texts.choices] == [r.choices[0].text, single]


def test_max_completion_tokens_and_chat_default_length(client):
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES,
                                       max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # No max_tokens: generation runs to the context length but never past it. A long prompt
    # keeps the room (and the test) short.
    long_message = "Count from one to one thousand in words. " + "one two three " * 22
    r = client.chat.completions.create(model="smollm2", temperature=0, messages=[
        {"role": "user", "content": long_message}], extra_body={"ignore_eos": True})
    assert E2E_MAX_MODEL_LEN - 40 < r.usage.prompt_tokens <= E2E_MAX_MODEL_LEN - 8
    assert r.usage.total_tokens == E2E_MAX_MODEL_LEN and r.choices[0].finish_reason == "length"


def test_extended_samplers_change_the_distribution(client):
    # top_k=1 makes sampling at temperature 1.5 greedy: the output must equal greedy's.
    greedy = _greedy_completion(client, "My favourite animal is", 10)
    r = client.completions.create(model="smollm2", prompt="My favourite animal is", max_tokens=10,
                                  temperature=1.5, seed=3, extra_body={"top_k": 1})
    assert r.choices[0].text == greedy


def test_async_client_concurrent(server):
    async def main():
        client = server.get_async_client()
        tasks = [client.chat.completions.create(model="smollm2", messages=MESSAGES,
                                                max_tokens=4, temperature=0) for _ in range(4)]
        results = await asyncio.gather(*tasks)
        stream = await client.chat.completions.create(model="smollm2", messages=MESSAGES,
                                                      max_tokens=4, temperature=0, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return [r.choices[0].message.content for r in results], streamed

    texts, streamed = asyncio.run(main())
    assert len(set(texts)) == 1 and texts[0] == streamed
