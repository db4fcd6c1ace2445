"""Tool-call parsers: the whole output and the same output fed in every split give the same
calls and content, markup never reaches content, broken calls come back as text."""

import json

import pytest

from aphrodite.frontend.tool_parsers import (TOOL_PARSERS, ArgumentsDelta, CallStart,
                                             ContentDelta, JsonArrayCalls)
from aphrodite.frontend.tool_parsers.base import collect, partial_marker_length

WEATHER = {"city": "Paris", "days": [1, 2], "note": "a } and a \" and ] inside"}
NESTED = {"q": {"deep": [{"x": None}, True, 1.5e3]}, "s": "[TOOL_CALLS] <tool_call>"}

# (parser, model output, expected content, expected [(name, arguments object)])
CASES = [
    ("hermes", "Let me check.\n<tool_call>\n" + json.dumps({"name": "weather", "arguments": WEATHER})
     + "\n</tool_call>", "Let me check.", [("weather", WEATHER)]),
    ("hermes", "<tool_call>" + json.dumps({"arguments": NESTED, "name": "search"}) + "</tool_call>\n"
     "<tool_call>" + json.dumps({"name": "now"}) + "</tool_call>", None,
     [("search", NESTED), ("now", {})]),
    ("hermes", "No tools needed: 2 < 3 and <tool is fine.", "No tools needed: 2 < 3 and <tool is fine.",
     []),
    ("llama3_json", "<|python_tag|>" + json.dumps({"name": "weather", "parameters": WEATHER}) + "; "
     + json.dumps({"name": "search", "arguments": NESTED}), None,
     [("weather", WEATHER), ("search", NESTED)]),
    ("llama3_json", json.dumps({"name": "now", "parameters": {}}), None, [("now", {})]),
    ("llama3_json", "Paris is sunny {today}.", "Paris is sunny {today}.", []),
    ("llama3_json", "Sure. <|python_tag|>" + json.dumps({"name": "now", "arguments": {}}), "Sure.",
     [("now", {})]),
    ("mistral", "Checking [TOOL_CALLS] " + json.dumps([{"name": "weather", "arguments": WEATHER},
                                                      {"name": "search", "arguments": NESTED}]),
     "Checking", [("weather", WEATHER), ("search", NESTED)]),
    ("mistral", "[TOOL_CALLS]weather[ARGS]" + json.dumps(WEATHER) + "[TOOL_CALLS]now[ARGS]{}", None,
     [("weather", WEATHER), ("now", {})]),
    ("mistral", "Arrays look like [1, 2] here.", "Arrays look like [1, 2] here.", []),
]


def stream(parser_cls, pieces):
    parser = parser_cls()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def splits(text, tokenizer):
    """The output character by character, in token-sized pieces, and in two halves at
    every position."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    yield list(text)
    yield [tokenizer.decode(ids[:i + 1])[len(tokenizer.decode(ids[:i])):] for i in range(len(ids))]
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]


def check_events(events, parser_cls):
    """Every call starts before its arguments, and no content carries markup."""
    started = set()
    for event in events:
        if isinstance(event, CallStart):
            started.add(event.index)
        elif isinstance(event, ArgumentsDelta):
            assert event.index in started
        else:
            for marker in parser_cls.markers:
                assert marker not in event.text


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_whole_output(name, text, content, calls):
    result = TOOL_PARSERS[name].parse(text)
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == calls
    for call in result.calls:   # the model's own text, not a re-serialisation
        assert call.arguments in text or call.arguments == "{}"


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_every_split_streams_the_same(name, text, content, calls, tokenizer):
    parser_cls = TOOL_PARSERS[name]
    whole = parser_cls.parse(text)
    for pieces in splits(text, tokenizer):
        assert "".join(pieces) == text
        events = stream(parser_cls, pieces)
        check_events(events, parser_cls)
        streamed_content, streamed_calls = collect(events)
        assert (streamed_content or None) == whole.content
        assert streamed_calls == whole.calls


def test_partial_marker_is_held_until_decided():
    parser = TOOL_PARSERS["hermes"]()
    assert parser.feed("Hi <tool") == [ContentDelta("Hi")]
    assert parser.feed("_c") == []
    assert parser.feed("ar") == [ContentDelta(" <tool_car")]
    assert partial_marker_length("abc<|py", ("<|python_tag|>",)) == 4
    assert partial_marker_length("abc", ("<|python_tag|>",)) == 0


def test_arguments_stream_before_the_call_ends():
    parser = TOOL_PARSERS["hermes"]()
    events = parser.feed('<tool_call>{"name": "f", "arguments": {"a": "long te')
    assert events == [CallStart(0, "f"), ArgumentsDelta(0, '{"a": "long te')]
    assert parser.feed('xt"}}</tool_call>') == [ArgumentsDelta(0, 'xt"}')]


@pytest.mark.parametrize("name,text", [
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": }}</tool_call>'),
    ("hermes", "Hi <tool_call>not json</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {"a": 1}}</tool_call>'),             # no name
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1'),             # cut off
    ("llama3_json", '{"name": "f", "parameters": {"a": [1, 2}}'),
    ("llama3_json", '{"answer": 42}'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a" 1}}]'),
    ("mistral", "[TOOL_CALLS]not a name![ARGS]{}"),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1'),
])
def test_malformed_call_is_returned_as_text(name, text):
    result = TOOL_PARSERS[name].parse(text)
    assert result.calls == [] and result.content == text.strip()


@pytest.mark.parametrize("name,text", [
    ("hermes", "Hi <tool_call>not json</tool_call>"),
    ("llama3_json", '{"answer": 42}'),
    ("mistral", "[TOOL_CALLS]not a name![ARGS]{}"),
    ("mistral", "[TOOL_CALLS]f[ARGS] nope"),
])
def test_call_that_breaks_before_its_name_streams_as_text(name, text, tokenizer):
    for pieces in splits(text, tokenizer):
        content, calls = collect(stream(TOOL_PARSERS[name], pieces))
        assert calls == [] and content == text.strip()


@pytest.mark.parametrize("name,text", [
    ("hermes", 'A <tool_call>oops</tool_call> B <tool_call>{"name": "now"}</tool_call>'),
    ("mistral", "[TOOL_CALLS]bad name![ARGS]{} [TOOL_CALLS]now[ARGS]{}"),
])
def test_a_broken_call_before_a_good_one_reads_the_same_in_every_split(name, text, tokenizer):
    whole = TOOL_PARSERS[name].parse(text)
    assert [c.name for c in whole.calls] == ["now"]
    for pieces in splits(text, tokenizer):
        content, calls = collect(stream(TOOL_PARSERS[name], pieces))
        assert (content or None, calls) == (whole.content, whole.calls)


def test_required_array_output():
    text = json.dumps([{"name": "weather", "parameters": WEATHER}, {"name": "now", "parameters": {}}])
    result = JsonArrayCalls.parse(text)
    assert result.content is None
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == [
        ("weather", WEATHER), ("now", {})]
    for pieces in (list(text), [text[:7], text[7:40], text[40:]]):
        assert collect(stream(JsonArrayCalls, pieces))[1] == result.calls


def test_mistral_call_ids_are_nine_alphanumerics():
    call_id = TOOL_PARSERS["mistral"].new_call_id()
    assert len(call_id) == 9 and call_id.isalnum()
    assert TOOL_PARSERS["hermes"].new_call_id().startswith("chatcmpl-tool-")
