"""Twenty JSON schemas of the shapes users send, for the structured-output validity tests and
benchmarks/structured_decode.py: nested objects, arrays with item bounds, enums, anyOf,
required and optional fields, string patterns and formats, bounded numbers, $defs.

Strings carry maxLength where a real schema would (names, codes, e-mail addresses); a few are
left unbounded on purpose, as many schemas in the wild are. A string that is unbounded in the
schema is unbounded in the output too: at temperature 1 a small model can fill max_tokens with
one e-mail address or one note body, and the cut JSON does not parse.
"""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 24}

SCHEMAS: dict[str, dict] = {
    "person": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"title": NAME, "subtitle": NAME, "pages": {"type": "integer",
                                                                  "minimum": 1}},
        "required": ["title"],
    },
    "nested_address": {
        "type": "object",
        "properties": {
            "name": NAME,
            "address": {
                "type": "object",
                "properties": {"street": NAME, "city": NAME,
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "tags_bounded": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
    },
    "enum_status": {
        "type": "object",
        "properties": {"status": {"enum": ["open", "closed", "pending"]},
                       "priority": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["status", "priority"],
    },
    "any_of_contact": {
        "type": "object",
        "properties": {"contact": {"anyOf": [
            {"type": "object", "properties": {"email": {"type": "string", "format": "email",
                                                        "maxLength": 40}},
             "required": ["email"]},
            {"type": "object", "properties": {"phone": {"type": "string",
                                                        "pattern": "^\\+[0-9]{6,12}$"}},
             "required": ["phone"]},
        ]}},
        "required": ["contact"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60},
                       "humidity": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                       "readings": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["temperature", "humidity", "readings"],
    },
    "date_event": {
        "type": "object",
        "properties": {"event": NAME, "date": {"type": "string", "format": "date"},
                       "start": {"type": "string", "format": "time",
                                 "maxLength": 16}},
        "required": ["event", "date"],
    },
    "uuid_record": {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"},
                       "created": {"type": "string", "format": "date-time"}},
        "required": ["id", "created"],
    },
    "array_of_objects": {
        "type": "array",
        "items": {"type": "object", "properties": {"sku": {"type": "string",
                                                           "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                                   "qty": {"type": "integer", "minimum": 1,
                                                           "maximum": 99}},
                  "required": ["sku", "qty"]},
        "minItems": 1, "maxItems": 3,
    },
    "booleans_and_null": {
        "type": "object",
        "properties": {"active": {"type": "boolean"}, "deleted": {"type": "null"},
                       "verified": {"type": "boolean"}},
        "required": ["active", "deleted"],
    },
    "defs_ref": {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": -9,
                                                 "maximum": 9},
                                           "y": {"type": "integer", "minimum": -9,
                                                 "maximum": 9}},
                            "required": ["x", "y"]}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "matrix": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                  "minItems": 2, "maxItems": 2},
        "minItems": 2, "maxItems": 2,
    },
    "ipv4_host": {
        "type": "object",
        "properties": {"host": {"type": "string", "format": "ipv4"},
                       "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
        "required": ["host", "port"],
    },
    "no_extra_properties": {
        "type": "object",
        "properties": {"key": NAME, "value": {"type": "string", "maxLength": 16}},
        "required": ["key", "value"],
        "additionalProperties": False,
    },
    "one_of_shape": {
        "oneOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"},
                                              "radius": {"type": "number", "minimum": 0,
                                                         "maximum": 10}},
             "required": ["kind", "radius"]},
            {"type": "object", "properties": {"kind": {"const": "square"},
                                              "side": {"type": "integer", "minimum": 1,
                                                       "maximum": 10}},
             "required": ["kind", "side"]},
        ],
    },
    "string_pattern_code": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
                       "country": {"enum": ["FR", "DE", "IT", "ES"]}},
        "required": ["code", "country"],
    },
    "deep_nesting": {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "object",
                       "properties": {"c": {"type": "object", "properties": {
                           "d": {"type": "integer", "minimum": 0, "maximum": 100}},
                           "required": ["d"]}}, "required": ["c"]}}, "required": ["b"]}},
        "required": ["a"],
    },
    "free_text_note": {        # an unbounded string, as many real schemas have
        "type": "object",
        "properties": {"title": {"type": "string"}, "body": {"type": "string",
                                                             "maxLength": 160}},
        "required": ["title"],
    },
    "mixed_list": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 1000},
            {"type": "string", "maxLength": 10}]}, "maxItems": 5}},
        "required": ["items"],
    },
}

assert len(SCHEMAS) == 20
