"""Request validation (pydantic models) and the OpenAI error shape, without a server."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from pydantic import ValidationError

from aphrodite.frontend.errors import from_validation_error
from aphrodite.frontend.openai_protocol import (ChatCompletionRequest, CompletionRequest,
                                                SamplerFields)
from aphrodite.sampling_params import SamplingParams


def chat(**fields) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def error_for(model, raw: bytes) -> dict:
    with pytest.raises(ValidationError) as exc:
        model.model_validate_json(raw)
    err = from_validation_error(exc.value)
    assert err.status == 400
    body = err.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_every_sampler_of_sampling_params_is_accepted_at_top_level():
    derived = {"bad_words_token_ids", "dry_sequence_breaker_ids"}
    openai_named = {"n", "temperature", "top_p", "seed", "stop", "max_tokens", "logprobs",
                    "prompt_logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
    names = {f.name for f in dataclasses.fields(SamplingParams)} - derived - openai_named
    assert names <= set(SamplerFields.model_fields)


def test_extended_fields_as_extra_body_sends_them():
    req = ChatCompletionRequest.model_validate_json(chat(
        top_k=40, min_p=0.05, typical_p=0.95, repetition_penalty=1.15, dry_multiplier=0.8,
        xtc_probability=0.5, custom_token_bans=[5], sampler_order=[0, 1]))
    sent = req.sent_sampler_fields()
    assert sent["top_k"] == 40 and sent["min_p"] == 0.05 and sent["typical_p"] == 0.95
    assert sent["repetition_penalty"] == 1.15 and sent["dry_multiplier"] == 0.8
    assert sent["banned_token_ids"] == [5] and sent["sampler_priority"] == [0, 1]
    assert "temperature" not in sent          # not sent: SamplingParams' default applies


def test_content_parts_and_roles():
    req = ChatCompletionRequest.model_validate_json(orjson.dumps({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}))
    assert [m.text() for m in req.messages] == ["be brief", "a\nb"]
    assert req.model is None and req.max_tokens is None


@pytest.mark.parametrize("raw,param", [
    (chat(temperature="hot"), "temperature"),
    (chat(max_tokens="ten"), "max_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(stream="yes"), "stream"),
    (chat(top_k="40"), "top_k"),
    (chat(stop=5), "stop"),
    (orjson.dumps({"messages": "hi"}), "messages"),
    (orjson.dumps({"messages": []}), "messages"),
    (orjson.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "messages.0.role"),
    (orjson.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
     "messages.0.content.0.type"),
    (orjson.dumps({"model": "m"}), "messages"),
])
def test_wrong_types_name_the_field(raw, param):
    assert error_for(ChatCompletionRequest, raw)["param"] == param


def test_integral_floats_are_accepted_for_integers():
    req = ChatCompletionRequest.model_validate_json(chat(max_tokens=20.0, top_k=40.0, n=2.0))
    assert (req.max_tokens, req.top_k, req.n) == (20, 40, 2)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]"])
def test_invalid_json_or_not_an_object(raw):
    err = error_for(ChatCompletionRequest, raw)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt):
    req = CompletionRequest.model_validate_json(orjson.dumps({"prompt": prompt}))
    assert req.prompt == prompt and req.max_tokens == 16


def test_completion_prompt_mixed_list_is_rejected():
    assert error_for(CompletionRequest, orjson.dumps({"prompt": [1, "a"]}))["param"].startswith("prompt")


def test_unknown_fields_are_ignored():
    req = ChatCompletionRequest.model_validate_json(chat(some_other_backend_field=1))
    assert req.model_extra == {"some_other_backend_field": 1}
