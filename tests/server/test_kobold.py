"""The KoboldAI API end to end: SillyTavern's KoboldAI-mode request sequence replayed against
the shared server (connect, generate, stream, abort, token counts), each answer read the way
SillyTavern reads it."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from server_utils import E2E_MAX_MODEL_LEN, shared_server, wait_idle

pytestmark = pytest.mark.slow   # starts the real server with the default model

IDLE_GAUGES = ("aphrodite:frontend_requests", "aphrodite:engine_core_requests",
               "aphrodite:num_requests_running", "aphrodite:num_requests_waiting")
PROMPT = "Once upon a time, in a quiet village by the sea,"
# What SillyTavern's server forwards in KoboldAI Classic mode (its UI defaults), with a full
# KoboldCpp sampler_order; DRY and XTC as Kobold Lite sends them.
ST_BODY = {"prompt": PROMPT, "use_story": False, "use_memory": False, "use_authors_note": False,
           "use_world_info": False, "max_context_length": E2E_MAX_MODEL_LEN, "max_length": 12,
           "rep_pen": 1.1, "rep_pen_range": 64, "rep_pen_slope": 0.9, "temperature": 0.8,
           "tfs": 1, "top_a": 0, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "typical": 1,
           "sampler_order": [6, 0, 1, 3, 4, 2, 5], "singleline": False,
           "use_default_badwordsids": True, "mirostat": 0, "mirostat_eta": 0.1,
           "mirostat_tau": 5, "grammar": "", "sampler_seed": 4321,
           "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2,
           "dry_sequence_breakers": "[\"\\n\", \":\"]", "xtc_threshold": 0.1,
           "xtc_probability": 0.5}


@pytest.fixture(scope="module")
def server():
    return shared_server()


def api(server, *parts: str) -> str:
    return server.url_for("api", *parts)


def sse_events(response) -> list[dict]:
    """Kobold's events: `event: message` then `data: {...}`; returns the data objects."""
    events, name = [], None
    for line in response.iter_lines(decode_unicode=False):
        line = line.decode("utf-8")
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            assert name == "message", line
            events.append(json.loads(line[len("data: "):]))
            name = None
    return events




def test_sillytavern_connects(server):
    """ST's status check: info/version, extra/version (.result) and model (.result)."""
    version = requests.get(api(server, "v1", "info", "version"), timeout=10).json()["result"]
    assert [int(part) for part in version.split(".")] >= [1, 2, 4]   # stop_sequence, badwords
    extra = requests.get(api(server, "extra", "version"), timeout=10).json()
    assert extra["result"] == "KoboldCpp"     # above every number: all of ST's kcpp features
    model = requests.get(api(server, "v1", "model"), timeout=10).json()["result"]
    assert model == "aphrodite/meta-llama/Llama-3.1-70B-Instruct" and model != "ReadOnly"
    for prefix in ("v1", "latest"):
        context = requests.get(api(server, prefix, "config", "max_context_length"), timeout=10)
        assert context.json() == {"value": E2E_MAX_MODEL_LEN}
        length = requests.get(api(server, prefix, "config", "max_length"), timeout=10).json()
        assert 1 <= length["value"] < E2E_MAX_MODEL_LEN
    assert requests.get(api(server, "extra", "true_max_context_length"),
                        timeout=10).json() == {"value": E2E_MAX_MODEL_LEN}


def test_tokencount_matches_the_tokenizer(server, tokenizer):
    r = requests.post(api(server, "extra", "tokencount"), json={"prompt": PROMPT}, timeout=10)
    expected = tokenizer.encode(PROMPT, add_special_tokens=True)
    assert r.json() == {"value": len(expected), "ids": expected}


@pytest.mark.parametrize("penalty", [{}, {"rep_pen": 1.5, "rep_pen_range": 6}])
def test_greedy_generate_equals_the_completions_route(server, penalty):
    """temperature 0 is greedy: the same text as /v1/completions for the same prompt, and
    rep_pen_range means the same on both routes."""
    r = requests.post(api(server, "v1", "generate"), timeout=60, json={
        "prompt": PROMPT, "max_length": 10, "max_context_length": 100, "temperature": 0,
        **penalty})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    openai_penalty = {"repetition_penalty": penalty["rep_pen"],
                      "rep_pen_range": penalty["rep_pen_range"]} if penalty else {}
    reference = requests.post(server.url_for("v1", "completions"), timeout=60, json={
        "prompt": PROMPT, "max_tokens": 10, "temperature": 0, **openai_penalty}
                              ).json()["choices"][0]
    assert result["text"] == reference["text"]
    assert result["finish_reason"] == ("length" if reference["finish_reason"] == "length"
                                       else "stop")


def test_stream_with_full_sampler_order_equals_the_whole_generation(server):
    whole = requests.post(api(server, "v1", "generate"), json=ST_BODY, timeout=60)
    assert whole.status_code == 200, whole.text
    text = whole.json()["results"][0]["text"]
    with requests.post(api(server, "extra", "generate", "stream"), json=ST_BODY, stream=True,
                       timeout=60) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
        events = sse_events(r)
    assert "".join(e["token"] for e in events) == text
    assert [e["finish_reason"] for e in events[:-1]] == ["null"] * (len(events) - 1)
    assert events[-1]["finish_reason"] == "length"      # EOS is banned (badwordsids)
    assert len(text) > 0


def test_abort_by_genkey_mid_stream_frees_the_request(server):
    genkey = "KCPP-test-abort"
    body = {**ST_BODY, "genkey": genkey, "max_length": 100, "temperature": 1.0}
    received: list[str] = []
    done = threading.Event()
    final: dict = {}

    def consume():
        with requests.post(api(server, "extra", "generate", "stream"), json=body, stream=True,
                           timeout=120) as r:
            name = None
            for line in r.iter_lines():
                line = line.decode("utf-8")
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    received.append(event["token"])
                    final.update(event)
        done.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(received) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(received) >= 3
    partial = requests.post(api(server, "extra", "generate", "check"),
                            json={"genkey": genkey}, timeout=10).json()["results"][0]["text"]
    assert partial.startswith("".join(received[:3])) and partial
    by_query = requests.get(api(server, "extra", "generate", "check"),
                            params={"genkey": genkey}, timeout=10).json()["results"][0]["text"]
    assert by_query.startswith(partial)
    aborted = requests.post(api(server, "extra", "abort"), json={"genkey": genkey}, timeout=10)
    assert aborted.json() == {"success": "true", "done": "true"}
    assert done.wait(30), "the stream did not end after the abort"
    assert final["finish_reason"] == "stop" and len(received) < 100
    assert wait_idle(server, IDLE_GAUGES) == dict.fromkeys(IDLE_GAUGES, 0)
    # the genkey is forgotten; SillyTavern's empty abort touches nothing
    assert requests.post(api(server, "extra", "generate", "check"), json={"genkey": genkey},
                         timeout=10).json() == {"results": [{"text": ""}]}
    assert requests.post(api(server, "extra", "abort"), timeout=10).json() == \
        {"success": "false", "done": "false"}


def test_errors_are_400_with_the_detail_sillytavern_reads(server):
    cases = [({"prompt": PROMPT, "max_length": 200, "max_context_length": 100}, "max_length"),
             ({"prompt": PROMPT, "max_length": 4, "mirostat": 1}, "mirostat"),
             ({"prompt": PROMPT, "max_length": 4, "grammar": "root ::= nowhere"}, "grammar"),
             ({"prompt": PROMPT, "max_length": 4, "rep_pen": -1}, "rep_pen"),
             ({"max_length": 4}, "prompt")]
    for body, param in cases:
        for route in (("v1", "generate"), ("extra", "generate", "stream")):
            r = requests.post(api(server, *route), json=body, timeout=30)
            assert r.status_code == 400, (route, body, r.text)
            error = r.json()
            assert error["error"]["param"] == param
            assert error["detail"]["msg"] == error["error"]["message"]
    assert requests.get(server.url_for("health"), timeout=10).status_code == 200
