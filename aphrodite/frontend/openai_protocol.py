"""Request bodies of the OpenAI-compatible routes, as pydantic models.

The same models validate requests (strict types: a string is not a number) and can
describe the API as JSON schema. Aphrodite's extra samplers (top_k, min_p, DRY, XTC ...)
are accepted at the top level, which is where the OpenAI SDK puts `extra_body`; their
fields are generated from SamplingParams, so every sampler the engine supports is
accepted here without a second list to keep in sync. Value ranges are checked in one
place, SamplingParams.validate(). Unknown fields are ignored, as OpenAI clients such as
SillyTavern send fields for other backends.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, create_model

from aphrodite.frontend.structured_request import REQUEST_FIELD_EFFECTS
from aphrodite.sampler_specs import SAMPLER_SPECS
from aphrodite.sampling_params import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


def _integral_float_to_int(value: Any) -> Any:
    # JavaScript clients may send 40.0 for 40; anything else non-integer stays an error.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral_float_to_int)]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: Optional[str] = None     # a JSON object as text, as OpenAI sends it


class ToolCall(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None     # an assistant's earlier calls
    tool_call_id: Optional[str] = None              # which call a tool message answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class FunctionDefinition(_Body):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None     # a JSON schema of the arguments object
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    """OpenAI's response_format: text, any JSON object, or a JSON schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


def _about(name: str) -> Any:
    return Field(None, description=REQUEST_FIELD_EFFECTS[name])


class GuidedFields(_Body):
    """Constrained decoding, as Aphrodite 0.6 and vLLM before 0.12 name it (the newer
    `structured_outputs` object is a sampler field; `response_format` is OpenAI's)."""
    response_format: Optional[ResponseFormat] = _about("response_format")
    guided_json: Union[dict[str, Any], str, None] = _about("guided_json")
    guided_regex: Optional[str] = _about("guided_regex")
    guided_choice: Optional[list[str]] = _about("guided_choice")
    guided_grammar: Optional[str] = _about("guided_grammar")
    guided_whitespace_pattern: Optional[str] = _about("guided_whitespace_pattern")
    guided_decoding_backend: Optional[str] = _about("guided_decoding_backend")


# Request fields that mean something different (or are typed differently) in the OpenAI
# API than in SamplingParams; the serving code maps them explicitly.
_OPENAI_OWNED = {"n", "temperature", "top_p", "seed", "stop", "max_tokens", "logprobs",
                 "prompt_logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
# Filled in by the frontend from other fields, never sent by clients.
_DERIVED = {"bad_words_token_ids", "dry_sequence_breaker_ids"}
# Lenient input forms that SamplingParams normalises (a JSON-array string, a single word).
_WIDER_TYPES = {"dry_sequence_breakers": Union[list[str], str], "bad_words": Union[list[str], str],
                "structured_outputs": dict[str, Any]}
# Names Aphrodite 0.6 / Kobold clients use for the same settings.
_ALIASES = {"banned_token_ids": "custom_token_bans", "dry_range": "dry_penalty_last_n",
            "sampler_priority": "sampler_order", "repetition_penalty_range": "rep_pen_range"}


def _request_type(tp: Any) -> Any:
    if tp is int:
        return Int
    if typing.get_origin(tp) in (Union, types.UnionType) and int in typing.get_args(tp):
        return Union[tuple(Int if arg is int else arg for arg in typing.get_args(tp))]
    return tp


def _sampler_fields() -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(SamplingParams)
    effects = {spec.name: spec.effect for spec in SAMPLER_SPECS}   # described in /openapi.json
    fields = {}
    for f in dataclasses.fields(SamplingParams):
        if f.name in _OPENAI_OWNED or f.name in _DERIVED or not f.init:
            continue
        tp = Optional[_WIDER_TYPES.get(f.name, _request_type(hints[f.name]))]
        alias = _ALIASES.get(f.name)
        fields[f.name] = (tp, Field(None, description=effects.get(f.name),
                                    validation_alias=AliasChoices(f.name, alias) if alias
                                    else None))
    return fields


# None means "not sent": SamplingParams' own default applies.
SamplerFields = create_model("SamplerFields", __base__=_Body, **_sampler_fields())


class _CommonRequest(SamplerFields, GuidedFields):
    model: Optional[str] = None
    n: Int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[Int] = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    def sent_sampler_fields(self) -> dict[str, Any]:
        """The extended sampler fields the client actually sent."""
        return {name: getattr(self, name) for name in SamplerFields.model_fields
                if getattr(self, name) is not None}


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[Int] = None
    max_completion_tokens: Optional[Int] = None
    logprobs: bool = False
    top_logprobs: Optional[Int] = None
    prompt_logprobs: Optional[Int] = None      # vLLM's extension, as in CompletionRequest
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None


class CompletionRequest(_CommonRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[Int] = 16
    echo: bool = False
    logprobs: Optional[Int] = None
    prompt_logprobs: Optional[Int] = None      # vLLM's extension: per-prompt-token logprobs
    best_of: Optional[Int] = None
    suffix: Optional[str] = None
    add_special_tokens: bool = True


class TokenizeRequest(_Body):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None   # default: True for prompt, False for messages
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]


# ---- responses documented in /openapi.json ---------------------------------------------------

class ErrorDetail(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer (errors.APIError)."""
    model_config = ConfigDict(strict=True, extra="forbid")
    error: ErrorDetail
