"""Structured outputs: what a request's text must match, and the grammar that enforces it.

A request names at most one constraint: a JSON schema (``json``), any JSON object
(``json_object``), a regular expression, a list of choices, or a grammar (Lark, or
llama.cpp's GBNF/EBNF). The frontend builds the constraint from the request's fields and
checks that it compiles (a 400 names the field); the engine core compiles it against the
model's tokenizer into an llguidance matcher whose token mask is applied before sampling.

llguidance is torch-free, so both the frontend and the engine core may import this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from aphrodite.sampler_specs import SamplingParamError

# JSON may carry whitespace between tokens (models trained on pretty-printed JSON need it),
# but a bounded run of it: unbounded whitespace lets a sampled model pad forever.
DEFAULT_JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputsParams:
    """Exactly one of json / json_object / regex / choice / grammar, plus JSON options."""
    json: str | dict | None = None          # a JSON schema, as an object or its JSON text
    json_object: bool | None = None         # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None              # Lark, or GBNF/EBNF as llama.cpp writes it
    whitespace_pattern: str | None = None   # JSON only: the regex whitespace must match
    disable_any_whitespace: bool = False    # JSON only: no whitespace between tokens

    def __post_init__(self):
        if self.json_object is False:
            self.json_object = None
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise SamplingParamError("json", f"is not valid JSON: {exc}") from None
        set_kinds = [k for k in _KINDS if getattr(self, k) is not None]
        if len(set_kinds) != 1:
            raise SamplingParamError(
                "structured_outputs",
                "must name exactly one of json, json_object, regex, choice and grammar"
                + (f" (got {', '.join(set_kinds)})" if set_kinds else ""))

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    # ---- wire form and cache key ----
    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}

    @classmethod
    def from_dict(cls, data: dict) -> "StructuredOutputsParams":
        return cls(**data)

    def cache_key(self) -> str:
        """Equal keys compile to the same grammar (the engine's compile cache)."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    # ---- grammar ----
    def grammar_text(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint. Raises ValueError when
        the constraint cannot be turned into one (a GBNF rule that is not defined, say)."""
        from llguidance import LLMatcher, gbnf_to_lark

        kind = self.kind
        if kind in ("json", "json_object"):
            schema = self.json if kind == "json" else {"type": "object"}
            if not isinstance(schema, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
            schema = close_objects(schema)
            options: dict[str, Any] = {"whitespace_pattern": DEFAULT_JSON_WHITESPACE}
            if self.disable_any_whitespace:
                options = {"whitespace_flexible": False}
            elif self.whitespace_pattern is not None:
                options = {"whitespace_pattern": self.whitespace_pattern}
            return LLMatcher.grammar_from_json_schema(schema, defaults=options)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(self.regex)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return LLMatcher.grammar_from_lark(gbnf_to_lark.any_to_lark(self.grammar))

    def check(self, param: str) -> str:
        """Validate without a tokenizer; returns the grammar text. Raises SamplingParamError
        naming ``param`` (the request field the constraint came from)."""
        from llguidance import LLMatcher

        kind = self.kind
        if kind == "choice":
            if not isinstance(self.choice, list) or not self.choice \
                    or not all(isinstance(c, str) and c for c in self.choice):
                raise SamplingParamError(param, "must be a non-empty list of non-empty strings")
        elif kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if not isinstance(value, str) or not value.strip():
                raise SamplingParamError(param, "must be a non-empty string")
        try:
            grammar = self.grammar_text()
        except Exception as exc:      # llguidance's GBNF converter raises plain Exception
            raise SamplingParamError(param, f"is not a valid {_NOUNS[kind]}: {exc}") from None
        error = LLMatcher.validate_grammar(grammar)
        if error:
            raise SamplingParamError(param, f"is not a valid {_NOUNS[kind]}: {error.strip()}")
        return grammar


# Keys whose value is one subschema, or a list or name map of subschemas.
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else",
              "additionalProperties", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
_OPENNESS_KEYS = ("additionalProperties", "unevaluatedProperties", "patternProperties")


def close_objects(schema: Any, in_all_of: bool = False) -> Any:
    """A copy of ``schema`` in which an object that lists its properties, and says nothing of
    others, admits only those (``additionalProperties: false``).

    The JSON Schema default admits any extra property, and a sampled model takes the offer:
    it keeps adding keys until max_tokens cuts the JSON. Generation wants the properties that
    were asked for, as OpenAI's strict mode and vLLM's default (xgrammar) backend give; a schema
    that wants extras says so with ``additionalProperties``. The branches of an ``allOf`` stay
    open, since each lists only part of the object's properties."""
    if isinstance(schema, list):
        return [close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(closed.get(key), (dict, list)):
            closed[key] = close_objects(closed[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [close_objects(s, in_all_of=key == "allOf") for s in closed[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: close_objects(s) for name, s in closed[key].items()}
    if "properties" in closed and not in_all_of and "allOf" not in closed \
            and not any(k in closed for k in _OPENNESS_KEYS):
        closed["additionalProperties"] = False
    return closed


_NOUNS = {"json": "JSON schema", "json_object": "JSON object constraint",
          "regex": "regular expression", "choice": "choice list", "grammar": "grammar"}
