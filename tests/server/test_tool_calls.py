"""Tool calling over HTTP.

(a) The default model, with no parser: tool_choice "required" and a named function are
forced by a JSON schema, so the calls' arguments validate against the tools' schemas
(jsonschema), a stream's argument fragments join to the same seed's whole response, and
instructor's TOOLS mode gets a validated pydantic object.
(b) tool_choice "auto" with each parser, on a tiny random model whose chat template renders
the tools: the request's own regex forces the model to write a call in the parser's format,
and the parsed calls, content, finish_reason and streamed deltas are checked against it.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import requests
import torch
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, LlamaConfig

from aphrodite.model_files import load_tokenizer, resolve_model
from server_utils import RemoteServer, shared_server

pytestmark = pytest.mark.slow   # starts real servers

MODEL = "smollm2"
WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": WEATHER_PARAMETERS}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def chat(server, body: dict) -> requests.Response:
    return requests.post(server.url_for("v1", "chat", "completions"), timeout=300,
                         json={"model": body.pop("model", MODEL), **body})


def stream_chunks(server, body: dict) -> list[dict]:
    r = chat(server, {**body, "stream": True})
    assert r.status_code == 200, r.text
    lines = [line.decode("utf-8") for line in r.iter_lines()]   # SSE is UTF-8
    return [json.loads(line[len("data: "):]) for line in lines
            if line.startswith("data: ") and line != "data: [DONE]"]


def assemble(chunks: list[dict]) -> tuple[str, list[dict], str | None, list[dict]]:
    """(content, calls {id, name, arguments} by index, finish_reason, tool-call deltas)."""
    content, calls, finish, call_deltas = "", {}, None, []
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                call_deltas.append(call)
                entry = calls.setdefault(call["index"], {"arguments": ""})
                if "id" in call:
                    assert "name" not in entry     # a call's head comes once
                    entry.update(id=call["id"], name=call["function"]["name"])
                entry["arguments"] += call["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish, call_deltas


# ---- (a) forced calls on the default model ----------------------------------------------------

@pytest.fixture(scope="module")
def server():
    return shared_server()


def test_tool_requests_that_cannot_be_served_are_400s(server):
    for fields, param in [({"tools": []}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
                          ({"tools": [WEATHER]}, "tool_choice"),   # auto needs a parser
                          ({"tools": [WEATHER], "tool_choice": {
                              "type": "function", "function": {"name": "other"}}}, "tool_choice")]:
        r = chat(server, {"messages": ASK, "max_tokens": 4, **fields})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = chat(server, {"messages": ASK, "max_tokens": 4, "tools": [WEATHER]})
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_forced_calls_validate_and_stream_the_same_arguments(server, choice):
    # One call at most: a 135M model asked for an open-ended array may repeat calls until
    # max_tokens.
    body = {"messages": ASK, "tools": [WEATHER, NOW], "tool_choice": choice,
            "parallel_tool_calls": False, "max_tokens": 60, "temperature": 0.8, "seed": 7}
    r = chat(server, dict(body))
    assert r.status_code == 200, r.text
    choice_out = r.json()["choices"][0]
    message = choice_out["message"]
    assert message["content"] is None and message["tool_calls"]
    expected_finish = "tool_calls" if choice == "required" else "stop"
    assert choice_out["finish_reason"] == expected_finish
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
        schema = WEATHER_PARAMETERS if call["function"]["name"] == "get_weather" else \
            {"type": "object", "maxProperties": 0}
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    if choice == NAMED:
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]

    content, calls, finish, _ = assemble(stream_chunks(server, dict(body)))
    assert content == "" and finish == expected_finish
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]


def test_required_without_parallel_calls_makes_one_call(server):
    r = chat(server, {"messages": ASK, "tools": [WEATHER, NOW], "tool_choice": "required",
                      "parallel_tool_calls": False, "max_tokens": 60, "temperature": 0})
    assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1


class Weather(BaseModel):
    city: str = Field(max_length=12)
    unit: str = Field(pattern="^[CF]$")


def test_instructor_tools_mode_returns_a_validated_object(server):
    import instructor
    client = instructor.from_openai(server.get_client(), mode=instructor.Mode.TOOLS)
    weather = client.chat.completions.create(model=MODEL, messages=ASK, response_model=Weather,
                                             max_tokens=48, temperature=0, max_retries=0)
    assert isinstance(weather, Weather)
    Weather.model_validate(weather.model_dump())


def test_history_with_tool_calls_and_results_is_accepted(server):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    r = chat(server, {"messages": history, "tools": [WEATHER], "tool_choice": "none",
                      "max_tokens": 3})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert "tool_calls" not in message and isinstance(message["content"], str)


# ---- (b) auto with each parser on a tiny random model ----------------------------------------

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions. <tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}{% for message in messages %}<|im_start|>{{ message.role }}
{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}{% else %}{{ message.content }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
LLAMA31_TEMPLATE = """<|begin_of_text|>{% if tools %}<|start_header_id|>system<|end_header_id|>

Environment: ipython
Given the following functions, reply with a JSON call.
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|eot_id|>{% endif %}{% for message in messages %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""
MISTRAL_TEMPLATE = """<s>{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{%- for message in messages %}{% if message.role == 'user' %}[INST]{{ message.content }}[/INST]
{%- else %}{{ message.content }}</s>{% endif %}{% endfor %}"""

CITY = "(Paris|Oslo)"
# parser: (chat template, forced output with CITY as a regex group, its content, call names)
FORMATS = {
    "hermes": (HERMES_TEMPLATE, 'Let me check. <tool_call>\n{"name": "get_weather", '
               '"arguments": {"city": "CITY", "unit": "C"}}\n</tool_call>\n<tool_call>\n'
               '{"name": "now", "arguments": {}}\n</tool_call>', "Let me check.",
               ["get_weather", "now"]),
    "llama3_json": (LLAMA31_TEMPLATE, '<|python_tag|>{"name": "get_weather", "parameters": '
                    '{"city": "CITY", "unit": "C"}}; {"name": "now", "parameters": {}}', None,
                    ["get_weather", "now"]),
    "mistral": (MISTRAL_TEMPLATE, '[TOOL_CALLS][{"name": "get_weather", "arguments": '
                '{"city": "CITY", "unit": "F"}}, {"name": "now", "arguments": {}}]', None,
                ["get_weather", "now"]),
}
MARKUP = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]")


def literal_regex(text: str) -> str:
    escaped = re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)
    return escaped.replace("CITY", CITY)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-tools")
    tokenizer = load_tokenizer(resolve_model(None))
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


@pytest.fixture(scope="module", params=list(FORMATS))
def auto_server(request, random_model, tmp_path_factory):
    folder, tokenizer = random_model
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(FORMATS[request.param][0])
    args = ["--model", str(folder), "--max-model-len", "512", "--kv-cache-memory", "64MiB",
            "--chat-template", str(template), "--tool-call-parser", request.param,
            "--enable-auto-tool-choice"]
    with RemoteServer(args) as remote:
        yield request.param, remote, tokenizer


def test_auto_tools_reach_the_prompt(auto_server):
    parser, server, tokenizer = auto_server
    r = chat(server, {"model": None, "messages": ASK, "tools": [WEATHER, NOW], "max_tokens": 1})
    assert r.status_code == 200, r.text
    rendered = tokenizer.apply_chat_template(ASK, chat_template=FORMATS[parser][0],
                                             tools=[WEATHER, NOW], tokenize=False,
                                             add_generation_prompt=True)
    assert '"name": "get_weather"' in rendered     # the template shows the tools
    expected = len(tokenizer.encode(rendered, add_special_tokens=False))
    assert r.json()["usage"]["prompt_tokens"] == expected


def test_auto_calls_parsed_and_streamed(auto_server):
    parser, server, _ = auto_server
    _, output, content, names = FORMATS[parser]
    body = {"model": None, "messages": ASK, "tools": [WEATHER, NOW], "max_tokens": 120,
            "temperature": 1.0, "seed": 3,
            "structured_outputs": {"regex": literal_regex(output)}}
    r = chat(server, dict(body))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["content"] == content
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == names
    city = json.loads(calls[0]["function"]["arguments"])["city"]
    forced = output.replace("CITY", city)
    assert json.loads(calls[0]["function"]["arguments"]) == {
        "city": city, "unit": "F" if parser == "mistral" else "C"}
    assert json.loads(calls[1]["function"]["arguments"]) == {}
    for call in calls:
        assert call["function"]["arguments"] in forced     # the model's text, as written
        if parser == "mistral":
            assert len(call["id"]) == 9 and call["id"].isalnum()
        else:
            assert call["id"].startswith("chatcmpl-tool-")

    streamed_content, streamed, finish, deltas = assemble(stream_chunks(server, dict(body)))
    assert finish == "tool_calls" and (streamed_content or None) == content
    assert not any(marker in streamed_content for marker in MARKUP)
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls]
    for delta in deltas:   # a head (id, type, name, "") or an arguments fragment only
        if "id" in delta:
            assert delta["type"] == "function" and delta["function"]["arguments"] == ""
        else:
            assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}

    single = chat(server, {**body, "parallel_tool_calls": False}).json()["choices"][0]
    assert [c["function"]["name"] for c in single["message"]["tool_calls"]] == names[:1]


def test_auto_without_a_call_is_plain_content(auto_server):
    parser, server, _ = auto_server
    r = chat(server, {"model": None, "messages": ASK, "tools": [WEATHER], "max_tokens": 6,
                      "temperature": 0})
    choice = r.json()["choices"][0]
    unparsed = chat(server, {"model": None, "messages": ASK, "tools": [WEATHER],
                             "tool_choice": "none", "max_tokens": 6, "temperature": 0})
    plain = unparsed.json()["choices"][0]["message"]["content"]
    assert "tool_calls" not in choice["message"]      # a random model writes no call here
    assert choice["message"]["content"] == (plain.strip() or None)
    assert choice["finish_reason"] == unparsed.json()["choices"][0]["finish_reason"]
    content, calls, finish, _ = assemble(stream_chunks(server, {
        "model": None, "messages": ASK, "tools": [WEATHER], "max_tokens": 6, "temperature": 0}))
    assert (content or None, calls, finish) == (choice["message"]["content"], [],
                                                choice["finish_reason"])
