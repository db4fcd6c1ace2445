"""Request fields -> SamplingParams.structured_outputs, and the 400s, without a server.

Requests are parsed by the real request models from JSON, as the server parses them; the
400s come out of OpenAIServing.sampling_params / check_structured_outputs as the client sees
them (the OpenAI error body)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import orjson
import pytest

from aphrodite.frontend import serving_base
from aphrodite.frontend.args import ServerOptions
from aphrodite.frontend.errors import APIError
from aphrodite.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from aphrodite.frontend.serving_base import OpenAIServing, ServingContext
from aphrodite.frontend.structured_request import (REQUEST_FIELDS, check_structured_outputs,
                                                   structured_outputs_from_request)
from aphrodite.sampler_specs import SamplingParamError
from aphrodite.structured_outputs import DEFAULT_JSON_WHITESPACE, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}))


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate_json(orjson.dumps({"prompt": "hi", **fields}))


def mapped(request) -> tuple[dict | None, str | None]:
    constraint, param = structured_outputs_from_request(request)
    return (None if constraint is None else constraint.to_dict()), param


@pytest.fixture(scope="module")
def serving():
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
    ctx = ServingContext(client=SimpleNamespace(vocab_size=49152, max_model_len=256),
                         tokenizer=None, model_names=["m"], chat_template=None,
                         response_role="assistant", max_logprobs=20, tokenizer_pool=pool)
    yield OpenAIServing(ctx, ServerOptions())
    pool.shutdown()


def error_of(call) -> dict:
    with pytest.raises(APIError) as exc:
        call()
    assert exc.value.status == 400
    body = exc.value.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


def params_for(serving, request, extra=None):
    return serving.sampling_params(request, max_tokens=8, logprobs=None, extra=extra)


# ---- mappings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [chat, completion])
@pytest.mark.parametrize("fields,expected,param", [
    ({"response_format": {"type": "text"}}, None, None),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
     {"json": SCHEMA}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "p", "schema": SCHEMA, "strict": False}}},
     {"json": SCHEMA}, "response_format.json_schema"),
    ({"guided_json": SCHEMA}, {"json": SCHEMA}, "guided_json"),
    ({"guided_json": orjson.dumps(SCHEMA).decode()}, {"json": SCHEMA}, "guided_json"),
    ({"guided_regex": "[0-9]{3}"}, {"regex": "[0-9]{3}"}, "guided_regex"),
    ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}, "guided_choice"),
    ({"guided_grammar": 'root ::= "a" | "b"'}, {"grammar": 'root ::= "a" | "b"'},
     "guided_grammar"),
    ({"guided_json": SCHEMA, "guided_whitespace_pattern": " ?"},
     {"json": SCHEMA, "whitespace_pattern": " ?"}, "guided_json"),
    ({"response_format": {"type": "json_object"}, "guided_whitespace_pattern": ""},
     {"json_object": True}, "response_format"),
    ({"guided_regex": "a+", "guided_whitespace_pattern": " "}, {"regex": "a+"}, "guided_regex"),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "outlines"}, {"json": SCHEMA},
     "guided_json"),
    ({"structured_outputs": {"json": SCHEMA}}, {"json": SCHEMA}, "structured_outputs.json"),
    ({"structured_outputs": {"json": orjson.dumps(SCHEMA).decode()}}, {"json": SCHEMA},
     "structured_outputs.json"),
    ({"structured_outputs": {"regex": "x", "json": None, "choice": None, "json_object": False}},
     {"regex": "x"}, "structured_outputs.regex"),
    ({"structured_outputs": {"json_object": True, "disable_any_whitespace": True}},
     {"json_object": True, "disable_any_whitespace": True}, "structured_outputs.json_object"),
    ({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": "[ ]?"},
      "guided_whitespace_pattern": "\n"},
     {"json": SCHEMA, "whitespace_pattern": "[ ]?"}, "structured_outputs.json"),
    ({"structured_outputs": {"choice": ["a"]}}, {"choice": ["a"]}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "start: /[a-z]+/"}}, {"grammar": "start: /[a-z]+/"},
     "structured_outputs.grammar"),
])
def test_each_field_maps_to_one_constraint(make, fields, expected, param):
    assert mapped(make(**fields)) == (expected, param)


@pytest.mark.parametrize("fields", [
    {},
    {"guided_json": {}, "guided_grammar": ""},               # SillyTavern, on every request
    {"guided_json": "", "guided_regex": "", "guided_choice": [], "guided_grammar": "  "},
    {"guided_json": "{}", "guided_whitespace_pattern": "", "guided_decoding_backend": ""},
    {"response_format": {"type": "text"}, "guided_json": {}},
    {"structured_outputs": None, "response_format": None, "guided_json": None},
])
def test_empty_fields_are_no_constraint(serving, fields):
    assert mapped(chat(**fields)) == (None, None)
    assert params_for(serving, chat(**fields)).structured_outputs is None


def test_the_constraint_reaches_sampling_params_and_the_wire(serving):
    params = params_for(serving, completion(guided_regex="[a-c]{2}", temperature=0))
    assert params.structured_outputs == StructuredOutputsParams(regex="[a-c]{2}")
    assert params.to_dict()["structured_outputs"] == {"regex": "[a-c]{2}"}
    params = params_for(serving, chat(response_format={"type": "json_object"}))
    assert params.to_dict()["structured_outputs"] == {"json_object": True}
    assert params.structured_outputs.grammar_text() == StructuredOutputsParams(
        json={"type": "object"}, whitespace_pattern=DEFAULT_JSON_WHITESPACE).grammar_text()


def test_a_forced_tool_schema_overrides_the_requests_own_fields(serving):
    request = chat(response_format={"type": "json_object"}, guided_regex="x+")
    tool_schema = {"json": {"type": "object", "properties": {"city": {"type": "string"}}}}
    params = params_for(serving, request, extra={"structured_outputs": tool_schema})
    assert params.to_dict()["structured_outputs"] == tool_schema
    as_object = StructuredOutputsParams(**tool_schema)
    params = params_for(serving, chat(guided_choice=["a"]), extra={"structured_outputs": as_object})
    assert params.structured_outputs == as_object
    # no override: the request's own (conflicting) fields are judged
    error = error_of(lambda: params_for(serving, request, extra={"structured_outputs": None}))
    assert error["param"] == "guided_regex"
    bad = {"json": {"type": "array", "uniqueItems": True}}
    error = error_of(lambda: params_for(serving, chat(), extra={"structured_outputs": bad}))
    assert error["param"] == "tools" and "uniqueItems" in error["message"]


# ---- 400s -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [chat, completion])
@pytest.mark.parametrize("fields,param,words", [
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     ["is required", '"schema"']),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema", ["needs a schema", '"schema"']),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "array",
                                                                  "uniqueItems": True}}}},
     "response_format.json_schema", ["not a valid JSON schema", "uniqueItems"]),
    ({"guided_json": {"type": "nonsense"}}, "guided_json", ["not a valid JSON schema"]),
    ({"guided_json": "{not json"}, "guided_json", ["not valid JSON"]),
    ({"guided_json": "[1, 2]"}, "guided_json", ["must be a JSON schema"]),
    ({"guided_regex": "(ab"}, "guided_regex", ["not a valid regular expression"]),
    ({"guided_grammar": 'root ::= "a" b'}, "guided_grammar", ["not a valid grammar", "b"]),
    ({"guided_choice": ["a", ""]}, "guided_choice", ["non-empty"]),
    ({"guided_json": SCHEMA, "guided_whitespace_pattern": "["}, "guided_whitespace_pattern",
     ["not a valid regular expression"]),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", ["non-empty"]),
    ({"structured_outputs": {"grammar": ""}}, "structured_outputs.grammar", ["non-empty"]),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex", ["must be a string"]),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object",
     ["must be true"]),
    ({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": "("}},
     "structured_outputs.whitespace_pattern", ["not a valid regular expression"]),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": "no"}},
     "structured_outputs.disable_any_whitespace", ["true or false"]),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag",
     ["not supported"]),
    ({"structured_outputs": {"json": SCHEMA, "disable_additional_properties": True}},
     "structured_outputs.disable_additional_properties", ["not supported"]),
    ({"structured_outputs": {}}, "structured_outputs", ["must name one of"]),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs",
     ["must name one of"]),
])
def test_bad_constraints_are_400s_naming_the_field(serving, make, fields, param, words):
    for call in (lambda: params_for(serving, make(**fields)),
                 lambda: asyncio.run(serving.check_structured_outputs(make(**fields)))):
        error = error_of(call)
        assert error["param"] == param
        assert error["message"].startswith(f"{param}: ")
        for word in words:
            assert word in error["message"], error["message"]


@pytest.mark.parametrize("fields,second,first", [
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex", "guided_json"),
    ({"guided_choice": ["a"], "guided_grammar": "start: \"a\""}, "guided_grammar",
     "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
      "guided_json": SCHEMA}, "guided_json", "response_format.json_schema"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "response_format", "structured_outputs.regex"),
    ({"structured_outputs": {"json": SCHEMA}, "guided_choice": ["a"]}, "guided_choice",
     "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice",
     "structured_outputs.regex"),
])
def test_two_constraints_are_refused_naming_the_second(serving, fields, second, first):
    for make in (chat, completion):
        error = error_of(lambda: params_for(serving, make(**fields)))
        assert error["param"] == second
        assert f"cannot be combined with {first}" in error["message"]


def test_the_check_runs_in_the_tokenizer_thread_and_is_cached(serving, monkeypatch):
    threads = []
    real = serving_base.check_structured_outputs

    def recording(constraint, param):
        threads.append(threading.current_thread().name)
        return real(constraint, param)

    monkeypatch.setattr(serving_base, "check_structured_outputs", recording)
    schema = {"type": "object", "properties": {"only_in_this_test": {"type": "boolean"}}}
    request = chat(guided_json=schema)
    asyncio.run(serving.check_structured_outputs(request))
    assert threads and threads[0].startswith("tokenizer")
    from aphrodite.frontend.structured_request import _check_cached
    hits = _check_cached.cache_info().hits
    params_for(serving, request)
    assert _check_cached.cache_info().hits == hits + 1     # checked once, not twice
    error_of(lambda: asyncio.run(serving.check_structured_outputs(chat(guided_regex="("))))
    error_of(lambda: asyncio.run(serving.check_structured_outputs(chat(guided_regex="("))))


def test_check_structured_outputs_raises_sampling_param_errors():
    check_structured_outputs(StructuredOutputsParams(choice=["x", "y"]), "guided_choice")
    with pytest.raises(SamplingParamError) as exc:
        check_structured_outputs(StructuredOutputsParams(regex="[z-a]"), "guided_regex")
    assert exc.value.param == "guided_regex"


def test_request_field_table_covers_the_guided_fields():
    from aphrodite.frontend.openai_protocol import GuidedFields
    assert [spec.name for spec in REQUEST_FIELDS] == list(GuidedFields.model_fields)


# ---- the offline API --------------------------------------------------------------------------

def offline_llm():
    """An LLM whose request preparation runs without an engine (it never reaches one here)."""
    from aphrodite.llm import LLM
    llm = LLM.__new__(LLM)
    llm.tokenizer = SimpleNamespace(encode=lambda text, **kw: [1, 2, 3])
    llm.max_model_len, llm.vocab_size, llm.engine = 64, 49152, None
    return llm


def test_offline_api_checks_the_constraint_before_the_engine():
    import aphrodite
    from aphrodite import SamplingParams
    assert aphrodite.StructuredOutputsParams is StructuredOutputsParams
    llm = offline_llm()
    good = SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA))
    _, ids, prepared = llm._prepare("hi", good)
    assert ids == [1, 2, 3] and prepared.structured_outputs == good.structured_outputs
    as_dict = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert llm._prepare("hi", as_dict)[2].structured_outputs.regex == "[0-9]+"
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(grammar='root ::= "a" b'))
    with pytest.raises(ValueError, match="structured_outputs: is not a valid grammar"):
        llm._prepare("hi", bad)
