"""StructuredOutputsParams' JSON schemas: objects that list their properties admit only those
unless the schema says otherwise (close_objects), checked with jsonschema on the rewritten
schema, and the JSON options reaching llguidance's grammar."""

import json

import jsonschema
import pytest

from aphrodite.structured_outputs import StructuredOutputsParams, close_objects

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def valid(schema, value) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def test_listed_properties_only():
    closed = close_objects(PERSON)
    assert valid(closed, {"name": "a"}) and not valid(closed, {"name": "a", "age": 3})
    assert valid(PERSON, {"name": "a", "age": 3})          # the input is left as it was


def test_nested_objects_close_everywhere_a_subschema_can_be():
    schema = {"type": "object", "properties": {
        "properties": PERSON,                                 # a property named "properties"
        "list": {"type": "array", "items": PERSON},
        "either": {"anyOf": [PERSON, {"type": "integer"}]},
        "ref": {"$ref": "#/$defs/p"}},
        "$defs": {"p": PERSON}}
    closed = close_objects(schema)
    extra = {"name": "a", "x": 1}
    for value in ({"properties": extra}, {"list": [extra]}, {"either": extra}, {"ref": extra},
                  {"unknown": 1}):
        assert valid(schema, value) and not valid(closed, value), value
    assert valid(closed, {"properties": {"name": "a"}, "list": [{"name": "b"}], "either": 3,
                          "ref": {"name": "c"}})


@pytest.mark.parametrize("schema", [
    {**PERSON, "additionalProperties": True},
    {**PERSON, "additionalProperties": {"type": "integer"}},
    {**PERSON, "patternProperties": {"^x": {}}},
    {**PERSON, "unevaluatedProperties": True},
    {"type": "object"},                                      # lists nothing: any object
])
def test_schemas_that_speak_of_other_properties_keep_them(schema):
    closed = close_objects(schema)
    assert valid(closed, {"name": "a", "x1": 1}) == valid(schema, {"name": "a", "x1": 1})


def test_all_of_branches_stay_open():
    schema = {"allOf": [PERSON, {"properties": {"age": {"type": "integer"}}}]}
    assert valid(close_objects(schema), {"name": "a", "age": 3})


def test_grammar_carries_the_closed_schema_and_whitespace_options():
    grammar = json.loads(StructuredOutputsParams(json=PERSON).grammar_text())
    schema = grammar["grammars"][0]["json_schema"]
    assert schema["additionalProperties"] is False
    tight = json.loads(StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
                       .grammar_text())["grammars"][0]["json_schema"]
    assert tight["x-guidance"]["whitespace_flexible"] is False
