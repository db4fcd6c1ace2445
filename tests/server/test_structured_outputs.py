"""Structured outputs over HTTP: the request fields' 400s on both routes, and constrained
outputs checked against independent references (jsonschema validation, re.fullmatch, the
choice list, the OpenAI SDK's and instructor's own parsing into pydantic models)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import requests
from pydantic import BaseModel, Field

from server_utils import shared_server

pytestmark = pytest.mark.slow   # starts the real server with the default model

MODEL = "smollm2"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Give a person's name and age as JSON."}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return server.get_client()


def post(server, route: str, body: dict) -> requests.Response:
    return requests.post(server.url_for("v1", *route.split("/")), timeout=300,
                         json={"model": MODEL, **body})


def route_body(route: str, fields: dict) -> dict:
    prompt = {"messages": ASK} if route == "chat/completions" else {"prompt": "JSON: "}
    return {**prompt, "max_tokens": 48, "temperature": 0, **fields}


def sse_text(response: requests.Response, route: str) -> tuple[str, str | None]:
    text, finish = "", None
    for line in response.iter_lines(decode_unicode=True):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[len("data: "):])["choices"]:
            text += (choice["delta"].get("content") or "") if route == "chat/completions" \
                else choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish


# ---- 400s before anything reaches the engine ------------------------------------------------

BAD = [
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json", "uniqueItems"),
    ({"guided_regex": "(ab"}, "guided_regex", "regular expression"),
    ({"guided_grammar": 'root ::= "a" b'}, "guided_grammar", "not a valid grammar"),
    ({"guided_choice": ["yes", ""]}, "guided_choice", "non-empty"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag",
     "not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema", "schema"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "wrong"}}}},
     "response_format.json_schema", "not a valid JSON schema"),
    ({"guided_json": SCHEMA, "guided_regex": "a+"}, "guided_regex", "cannot be combined"),
]


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_bad_constraints_are_400s_and_the_server_keeps_serving(server, route):
    for fields, param, words in BAD:
        for stream in (False, True):
            r = post(server, route, route_body(route, {**fields, "stream": stream}))
            assert r.status_code == 400, (fields, r.text)
            error = r.json()["error"]
            assert error["param"] == param and words in error["message"], error
            assert error["type"] == "invalid_request_error"
    r = post(server, route, route_body(route, {"max_tokens": 2, "guided_json": {},
                                               "guided_grammar": ""}))   # SillyTavern's empties
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert requests.get(server.url_for("health"), timeout=10).status_code == 200


# ---- constrained outputs -----------------------------------------------------------------------

def test_sdk_parse_returns_a_validated_pydantic_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person,
                                               max_tokens=64, temperature=0)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person)
    assert Person.model_validate_json(message.content) == message.parsed


def test_instructor_json_schema_mode_returns_a_validated_object(server):
    import instructor
    patched = instructor.from_openai(server.get_client(), mode=instructor.Mode.JSON_SCHEMA)
    person = patched.chat.completions.create(model=MODEL, messages=ASK, response_model=Person,
                                             max_tokens=64, temperature=0, max_retries=0)
    assert isinstance(person, Person)
    Person.model_validate(person.model_dump())


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_json_schema_and_json_object_outputs_validate(server, route):
    for fields in ({"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": SCHEMA}}},
                   {"guided_json": SCHEMA}, {"structured_outputs": {"json": SCHEMA}}):
        r = post(server, route, route_body(route, {**fields, "max_tokens": 64}))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if route == "chat/completions" else choice["text"]
        jsonschema.validate(json.loads(text), SCHEMA)
        assert choice["finish_reason"] == "stop"
    r = post(server, route, route_body(route, {"response_format": {"type": "json_object"},
                                               "max_tokens": 64}))
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if route == "chat/completions" else choice["text"]
    assert choice["finish_reason"] == "stop" and isinstance(json.loads(text), dict)


def test_streamed_json_schema_output_concatenates_to_valid_json(server):
    body = route_body("chat/completions", {"stream": True, "max_tokens": 64, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}})
    with post(server, "chat/completions", body) as r:
        assert r.status_code == 200
        text, finish = sse_text(r, "chat/completions")
    jsonschema.validate(json.loads(text), SCHEMA)
    assert finish == "stop"


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_regex_choice_and_grammar_outputs_match(server, route):
    regex = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
    grammar = 'root ::= ("yes" | "no") ", " [0-9] [0-9]?'
    cases = [({"guided_regex": regex}, lambda t: re.fullmatch(regex, t)),
             ({"structured_outputs": {"regex": regex}}, lambda t: re.fullmatch(regex, t)),
             ({"guided_choice": ["red", "green", "blue"]},
              lambda t: t in ("red", "green", "blue")),
             ({"guided_grammar": grammar}, lambda t: re.fullmatch(r"(yes|no), [0-9][0-9]?", t))]
    for fields, matches in cases:
        for seed in (None, 7):
            sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
            r = post(server, route, {**route_body(route, fields), **sampling})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            text = choice["message"]["content"] if route == "chat/completions" else choice["text"]
            assert choice["finish_reason"] == "stop" and matches(text), (fields, text)
