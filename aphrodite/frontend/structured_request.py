"""A request's constraint fields turned into one StructuredOutputsParams.

Clients name a constraint three ways: OpenAI's ``response_format``, the ``guided_*`` fields of
Aphrodite 0.6 and vLLM before 0.12, and vLLM's ``structured_outputs`` object. A request may
use one of them for one constraint; a second is refused rather than merged, so no request
silently loses half of what it asked for. Every error is a SamplingParamError naming the
request field, which the serving code turns into a 400.

The request is read by attribute (the models in openai_protocol.py), so this module does not
import them: openai_protocol takes the field descriptions below for /openapi.json.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from aphrodite.sampler_specs import ParamSpec, SamplingParamError
from aphrodite.structured_outputs import StructuredOutputsParams

_CONSTRAINT_KEYS = ("json", "json_object", "regex", "choice", "grammar")
_OPTION_KEYS = ("whitespace_pattern", "disable_any_whitespace")
_JSON_KINDS = ("json", "json_object")
_SCHEMA_EXAMPLE = ('{"type": "json_schema", "json_schema": {"name": "answer", '
                   '"schema": {"type": "object", ...}}}')

# The request fields that set structured_outputs, as GET /v1/samplers lists them beside it.
REQUEST_FIELDS = (
    ParamSpec("response_format", "dict|null", None,
              "OpenAI's output format: {\"type\": \"text\"} (no constraint), {\"type\": "
              "\"json_object\"} (any JSON object) or {\"type\": \"json_schema\", \"json_schema\": "
              "{\"name\", \"schema\", \"strict\"}} (the schema is enforced whatever strict says).",
              range_text="type text, json_object or json_schema"),
    ParamSpec("guided_json", "dict|str|null", None,
              "Constrain the output to this JSON schema (an object or its JSON text); the "
              "Aphrodite 0.6 / vLLM < 0.12 name of structured_outputs.json. {} is ignored.",
              range_text="a JSON schema"),
    ParamSpec("guided_regex", "str|null", None,
              "Constrain the output to match this regular expression (structured_outputs.regex). "
              "An empty string is ignored.", range_text="a regular expression"),
    ParamSpec("guided_choice", "list[str]|null", None,
              "The output is exactly one of these strings (structured_outputs.choice). An empty "
              "list is ignored.", range_text="non-empty strings"),
    ParamSpec("guided_grammar", "str|null", None,
              "Constrain the output to a Lark or GBNF/EBNF grammar (structured_outputs.grammar). "
              "An empty string is ignored.", range_text="a Lark or GBNF grammar"),
    ParamSpec("guided_whitespace_pattern", "str|null", None,
              "JSON constraints only: the regular expression whitespace between JSON tokens "
              "must match (structured_outputs.whitespace_pattern).",
              range_text="a regular expression"),
    ParamSpec("guided_decoding_backend", "str|null", None,
              "Accepted and ignored: every constraint runs on llguidance.", range_text="any"),
)
REQUEST_FIELD_EFFECTS = {spec.name: spec.effect for spec in REQUEST_FIELDS}


def structured_outputs_from_request(request: Any
                                    ) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the field it came from, or (None, None).

    Cheap: nothing is compiled here (check_structured_outputs does that)."""
    found: list[tuple[str, dict]] = []
    for param, fields in _sources(request):
        if found:
            raise SamplingParamError(param, f"cannot be combined with {found[0][0]}; send one "
                                     "constraint per request")
        found.append((param, fields))
    if not found:
        return None, None
    param, fields = found[0]
    whitespace = _nonempty(getattr(request, "guided_whitespace_pattern", None))
    if whitespace is not None:
        _require(isinstance(whitespace, str), "guided_whitespace_pattern", "must be a string")
        if any(k in fields for k in _JSON_KINDS) and "whitespace_pattern" not in fields:
            fields["whitespace_pattern"] = whitespace
    return StructuredOutputsParams(**fields), param


def check_structured_outputs(params: StructuredOutputsParams, param: str) -> None:
    """Compile-check the constraint (milliseconds for a large schema: call it off the event
    loop where it matters). Raises SamplingParamError naming ``param``."""
    _check_cached(params.cache_key(), param)


@lru_cache(maxsize=256)
def _check_cached(cache_key: str, param: str) -> None:
    # Clients send the same schema again and again (a tool's, an app's); only passes are
    # cached, so a refused constraint is refused with its message every time.
    params = StructuredOutputsParams.from_dict(json.loads(cache_key))
    if params.whitespace_pattern is not None:
        StructuredOutputsParams(regex=params.whitespace_pattern).check(
            _whitespace_param(param))
    params.check(param)


def _whitespace_param(param: str) -> str:
    if param.startswith("structured_outputs"):
        return "structured_outputs.whitespace_pattern"
    return "guided_whitespace_pattern"


# ---- each way of naming a constraint ------------------------------------------------------

def _sources(request: Any):
    """(field name, StructuredOutputsParams keyword arguments) for every constraint sent."""
    so = getattr(request, "structured_outputs", None)
    if so is not None:
        yield from _from_structured_outputs(so)
    response_format = getattr(request, "response_format", None)
    if response_format is not None:
        yield from _from_response_format(response_format)
    guided_json = _nonempty(getattr(request, "guided_json", None))
    if isinstance(guided_json, str):
        guided_json = _parse_json(guided_json, "guided_json")
    if guided_json not in (None, {}):
        _require(isinstance(guided_json, (dict, bool)), "guided_json",
                 "must be a JSON schema (an object)")
        yield "guided_json", {"json": guided_json}
    for kind in ("regex", "choice", "grammar"):
        value = _nonempty(getattr(request, f"guided_{kind}", None))
        if value is not None:
            yield f"guided_{kind}", {kind: value}


def _from_structured_outputs(so: Any):
    if isinstance(so, StructuredOutputsParams):
        so = so.to_dict()
    _require(isinstance(so, dict), "structured_outputs", "must be an object")
    for key in so:
        if key not in _CONSTRAINT_KEYS and key not in _OPTION_KEYS:
            raise SamplingParamError(
                f"structured_outputs.{key}", "is not supported by this server (supported: "
                f"{', '.join(_CONSTRAINT_KEYS + _OPTION_KEYS)})")
    # null (and json_object false) mean "not this one", as clients that dump a whole
    # vLLM StructuredOutputsParams send them
    sent = {k: v for k, v in so.items() if v is not None and not (k == "json_object"
                                                                  and v is False)}
    kinds = [k for k in _CONSTRAINT_KEYS if k in sent]
    if not kinds:
        raise SamplingParamError("structured_outputs", "must name one of "
                                 f"{', '.join(_CONSTRAINT_KEYS)}")
    if len(kinds) > 1:
        raise SamplingParamError(f"structured_outputs.{kinds[1]}", "cannot be combined with "
                                 f"structured_outputs.{kinds[0]}; send one constraint per request")
    kind = kinds[0]
    value = sent[kind]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        if isinstance(value, str):
            value = _parse_json(value, param)
        _require(isinstance(value, (dict, bool)), param, "must be a JSON schema (an object)")
    elif kind == "json_object":
        _require(value is True, param, "must be true")
    elif kind == "choice":
        _require(isinstance(value, list), param, "must be a list of strings")
    else:
        _require(isinstance(value, str), param, "must be a string")
    fields = {kind: value}
    if sent.get("whitespace_pattern") is not None:
        _require(isinstance(sent["whitespace_pattern"], str),
                 "structured_outputs.whitespace_pattern", "must be a string")
        fields["whitespace_pattern"] = sent["whitespace_pattern"]
    if "disable_any_whitespace" in sent:
        _require(isinstance(sent["disable_any_whitespace"], bool),
                 "structured_outputs.disable_any_whitespace", "must be true or false")
        fields["disable_any_whitespace"] = sent["disable_any_whitespace"]
    yield param, fields


def _from_response_format(response_format: Any):
    kind = response_format.type
    if kind == "json_object":
        yield "response_format", {"json_object": True}
    elif kind == "json_schema":
        json_schema = response_format.json_schema
        if json_schema is None or json_schema.schema_ is None:
            missing = "is required" if json_schema is None else "needs a schema"
            raise SamplingParamError("response_format.json_schema", f"{missing} when "
                                     f"response_format.type is 'json_schema'; send "
                                     f"{_SCHEMA_EXAMPLE}")
        yield "response_format.json_schema", {"json": json_schema.schema_}


# ---- small helpers ---------------------------------------------------------------------------

def _nonempty(value: Any) -> Any:
    """None for the empty values clients such as SillyTavern send on every request."""
    if value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _parse_json(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SamplingParamError(param, f"is not valid JSON: {exc}") from None


def _require(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise SamplingParamError(param, message)
