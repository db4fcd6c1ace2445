"""tool_choice turned into a plan: the JSON schemas that force required and named calls
(checked with jsonschema against example outputs), $defs hoisting, the 400s, and the
response shapes built from a plan."""

import copy
import json
from types import SimpleNamespace

import jsonschema
import pytest

from aphrodite.frontend.args import ServerOptions
from aphrodite.frontend.detokenizer import RequestDetokenizer
from aphrodite.frontend.errors import APIError
from aphrodite.frontend.openai_protocol import ChatCompletionRequest
from aphrodite.frontend.tool_call_output import StreamedToolCalls, message_fields
from aphrodite.frontend.tool_calls import plan_tool_calls, special_token_texts
from aphrodite.frontend.tool_parsers import TOOL_PARSERS
from aphrodite.structured_outputs import StructuredOutputsParams

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"$ref": "#/$defs/Unit"}},
        "required": ["city"], "$defs": {"Unit": {"enum": ["C", "F"]}}}}}
NOW = {"type": "function", "function": {"name": "now"}}
AUTO = ServerOptions(tool_call_parser="hermes", enable_auto_tool_choice=True)


def request(**fields):
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **fields})


def plan(options=ServerOptions(), **fields):
    return plan_tool_calls(request(**fields), options)


def schema_of(p):
    return p.structured_outputs["json"]


def test_no_tools_no_plan():
    assert plan() is None


@pytest.mark.parametrize("fields,param,words", [
    ({"tools": []}, "tools", "empty"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tool_choice": "none"}, "tool_choice", "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope'"),
    ({"tools": [WEATHER]}, "tool_choice", "--enable-auto-tool-choice and --tool-call-parser"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "--tool-call-parser"),
])
def test_bad_requests_name_the_field(fields, param, words):
    with pytest.raises(APIError) as caught:
        plan(**fields)
    assert caught.value.status == 400 and caught.value.param == param
    assert words in caught.value.message


def test_tools_default_to_auto_with_a_parser():
    p = plan(AUTO, tools=[WEATHER])
    assert p.mode == "auto" and p.parser.name == "hermes" and p.structured_outputs is None
    assert p.tools == [WEATHER]     # rendered by the template as sent


def test_none_renders_tools_and_reads_no_calls():
    p = plan(tools=[WEATHER], tool_choice="none")
    assert p.tools == [WEATHER] and not p.reads_calls and p.structured_outputs is None


def test_named_schema_is_the_functions_parameters():
    p = plan(tools=[WEATHER, NOW], tool_choice={"type": "function",
                                                "function": {"name": "get_weather"}})
    assert schema_of(p) == WEATHER["function"]["parameters"]
    jsonschema.validate({"city": "Oslo", "unit": "C"}, schema_of(p))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"unit": "K"}, schema_of(p))
    named_now = plan(tools=[WEATHER, NOW], tool_choice={"type": "function",
                                                        "function": {"name": "now"}})
    assert schema_of(named_now) == {"type": "object", "properties": {},
                                    "additionalProperties": False}
    jsonschema.validate({}, schema_of(named_now))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"x": 1}, schema_of(named_now))


def test_required_schema_accepts_calls_and_refuses_others():
    schema = schema_of(plan(tools=[WEATHER, NOW], tool_choice="required"))
    assert schema["$defs"] == {"Unit": {"enum": ["C", "F"]}}      # hoisted
    assert '"$defs":' not in json.dumps(schema["items"])
    good = [{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F"}},
            {"name": "now", "parameters": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"unit": "K", "city": "x"}}],
                [{"name": "other", "parameters": {}}], [{"name": "now"}],
                [{"name": "now", "parameters": {"x": 1}}],
                [{"name": "now", "parameters": {}, "extra": 1}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    StructuredOutputsParams(json=schema).check("tools")       # compiles for llguidance


def test_required_without_parallel_allows_one_call():
    schema = schema_of(plan(tools=[WEATHER, NOW], tool_choice="required",
                            parallel_tool_calls=False))
    jsonschema.validate([{"name": "now", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "parameters": {}}] * 2, schema)


def test_conflicting_defs_are_a_400():
    other = {"type": "function", "function": {"name": "other", "parameters": {
        "type": "object", "$defs": {"Unit": {"enum": ["K"]}}}}}
    with pytest.raises(APIError) as caught:
        plan(tools=[WEATHER, other], tool_choice="required")
    assert caught.value.param == "tools"


def test_messages_and_finish_reasons():
    required = plan(tools=[WEATHER, NOW], tool_choice="required")
    text = json.dumps([{"name": "now", "parameters": {}},
                       {"name": "get_weather", "parameters": {"city": "Oslo"}}])
    fields, finish = message_fields(required, text, "stop")
    assert finish == "tool_calls" and fields["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in fields["tool_calls"]] == [("now", {}), ("get_weather", {"city": "Oslo"})]
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function"
               for c in fields["tool_calls"])
    single = plan(tools=[WEATHER, NOW], tool_choice="required", parallel_tool_calls=False)
    assert len(message_fields(single, text, "stop")[0]["tool_calls"]) == 1
    named = plan(tools=[WEATHER], tool_choice={"type": "function",
                                               "function": {"name": "get_weather"}})
    fields, finish = message_fields(named, '{"city": "Oslo"}', "stop")
    assert finish == "stop" and fields["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert message_fields(named, '{"city": "Os', "length")[1] == "length"
    auto = plan(AUTO, tools=[WEATHER])
    assert message_fields(auto, "Just text.", "stop") == ({"content": "Just text."}, "stop")
    mistral = ServerOptions(tool_call_parser="mistral")     # its ids in every mode
    forced = plan(mistral, tools=[WEATHER], tool_choice="required")
    call_id = message_fields(forced, text.replace("now", "get_weather"), "stop")[0][
        "tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum()


def test_required_cut_by_max_tokens_keeps_the_finished_calls():
    required = plan(tools=[WEATHER, NOW], tool_choice="required")
    done = [{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "now",
                                                                       "parameters": {}}]
    whole = json.dumps(done + [{"name": "get_weather", "parameters": {"city": "Rome"}}])
    cut = whole[:whole.rindex("Rome")]
    fields, finish = message_fields(required, cut, "length")
    assert finish == "length" and fields["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in fields["tool_calls"]] == [(d["name"], d["parameters"]) for d in done]
    first_cut = whole[:whole.index("Oslo")]               # no call finished: the text
    fields, finish = message_fields(required, first_cut, "length")
    assert fields == {"content": first_cut} and finish == "length"


def stream_deltas(p, pieces):
    calls = StreamedToolCalls(p)
    deltas = []
    for k, piece in enumerate(pieces):
        deltas += calls.deltas(piece, final=k == len(pieces) - 1)
    return deltas, calls


def test_stream_deltas_join_to_the_message():
    auto = plan(AUTO, tools=[WEATHER, NOW], parallel_tool_calls=False)
    text = ('Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '</tool_call><tool_call>{"name": "now", "arguments": {}}</tool_call>')
    deltas, calls = stream_deltas(auto, list(text))
    assert calls.finish_reason("stop") == "tool_calls"
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    heads = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [(h["index"], h["type"], h["function"]) for h in heads] == [
        (0, "function", {"name": "get_weather", "arguments": ""})]     # parallel off: one call
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas
                        if "tool_calls" in d)
    fields, _ = message_fields(auto, text, "stop")
    assert arguments == fields["tool_calls"][0]["function"]["arguments"]


def test_parameterless_named_call_streams_empty_object():
    named = plan(tools=[NOW], tool_choice={"type": "function", "function": {"name": "now"}})
    deltas, calls = stream_deltas(named, ["{", "}"])
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "now", "arguments": ""}
    assert [d["tool_calls"][0]["function"] for d in deltas[1:]] == [{"arguments": "{"},
                                                                   {"arguments": "}"}]
    assert calls.finish_reason("stop") == "stop"
    deltas, _ = stream_deltas(named, [""])
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == "{}"


def test_special_token_markers_survive_detokenising_only_when_kept(tokenizer):
    """Where a parser's marker is a special token (Mistral's [TOOL_CALLS]), the default
    skip_special_tokens would drop it before the parser sees it."""
    mistral_like = copy.deepcopy(tokenizer)
    mistral_like.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    assert "[TOOL_CALLS]" in special_token_texts(mistral_like)
    assert "[TOOL_CALLS]" not in special_token_texts(tokenizer)
    output = '[TOOL_CALLS][{"name": "now", "arguments": {}}]'
    ids = mistral_like.encode(output, add_special_tokens=False)
    for skip, calls in ((True, []), (False, ["now"])):
        params = SimpleNamespace(stop=None, include_stop_str_in_output=False,
                                 skip_special_tokens=skip, min_tokens=0)
        detokenizer = RequestDetokenizer(mistral_like, [1], params)
        text = detokenizer.add_tokens(ids)[0] + detokenizer.finish()
        assert [c.name for c in TOOL_PARSERS["mistral"].parse(text).calls] == calls
