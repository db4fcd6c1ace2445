"""Structured outputs hold under real sampling: the default model at temperature 1.0, twenty JSON
schemas of varied shape (tests/json_schemas.py), regexes and choices, alone, with n=4, and in
one batch that mixes schemas with unconstrained rows.

The reference is independent of the engine: `jsonschema` (with its format checker) for JSON,
`re.fullmatch` for regexes, list membership for choices. Every output must pass, and must end
because its grammar completed (finish_reason "stop"), not because it ran out of tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from aphrodite import LLM, SamplingParams
from aphrodite.structured_outputs import StructuredOutputsParams
from json_schemas import SCHEMAS

pytestmark = pytest.mark.slow   # loads the default model

MAX_TOKENS = 256
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no), because [a-z ]{1,30}\.", r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8}){0,2}"]
CHOICES = [["red", "green", "blue"], ["Paris", "Rome", "Madrid", "Berlin"]]


@pytest.fixture(scope="module")
def llm():
    with LLM(max_num_seqs=64) as engine:
        yield engine


def prompt_for(what: str) -> str:
    return f"<|im_start|>user\n{what}<|im_end|>\n<|im_start|>assistant\n"


def json_params(schema: dict, seed: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=MAX_TOKENS,
                          structured_outputs=StructuredOutputsParams(json=schema))


def check_json(schema: dict, completion) -> None:
    assert completion.finish_reason == "stop", (completion.finish_reason, completion.text)
    value = json.loads(completion.text)
    jsonschema.validate(value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_twenty_schemas_sampled_at_temperature_one(llm):
    names = list(SCHEMAS)
    prompts = [prompt_for(f"Give me a JSON value for '{name}'.") for name in names]
    outs = llm.generate(prompts, [json_params(SCHEMAS[name], seed=i) for i, name in
                                  enumerate(names)], use_tqdm=False)
    for name, out in zip(names, outs):
        check_json(SCHEMAS[name], out.outputs[0])


def test_n4_each_sample_valid(llm):
    for name in ("nested_address", "any_of_contact", "free_text_note"):
        out, = llm.generate([prompt_for(f"A JSON {name}.")],
                            json_params(SCHEMAS[name], seed=7, n=4), use_tqdm=False)
        assert len(out.outputs) == 4
        for completion in out.outputs:
            check_json(SCHEMAS[name], completion)


def test_regex_and_choice(llm):
    prompts, params = [], []
    for i, pattern in enumerate(REGEXES):
        prompts.append(prompt_for("Answer in the requested format."))
        params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=64,
                                     structured_outputs=StructuredOutputsParams(regex=pattern)))
    for i, options in enumerate(CHOICES):
        prompts.append(prompt_for("Pick one."))
        params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=16,
                                     structured_outputs=StructuredOutputsParams(choice=options)))
    outs = llm.generate(prompts, params, use_tqdm=False)
    for pattern, out in zip(REGEXES, outs):
        assert re.fullmatch(pattern, out.outputs[0].text), (pattern, out.outputs[0].text)
    for options, out in zip(CHOICES, outs[len(REGEXES):]):
        assert out.outputs[0].text in options
        assert out.outputs[0].finish_reason == "stop"


def test_mixed_batch_schemas_and_free_rows(llm):
    """Constrained rows under different schemas beside unconstrained ones: every constrained
    row validates, and each unconstrained row is exactly what it samples alone (the masks of
    its neighbours do not reach it)."""
    names = ["person", "matrix", "enum_status", "defs_ref", "mixed_list", "uuid_record"]
    free = SamplingParams(temperature=1.0, seed=123, max_tokens=24, ignore_eos=True)
    prompts, params = [], []
    for i, name in enumerate(names):
        prompts += [prompt_for(f"JSON for {name}."), prompt_for("Tell me a story.")]
        params += [json_params(SCHEMAS[name], seed=100 + i), free]
    outs = llm.generate(prompts, params, use_tqdm=False)
    alone, = llm.generate([prompt_for("Tell me a story.")], free, use_tqdm=False)
    for i, name in enumerate(names):
        check_json(SCHEMAS[name], outs[2 * i].outputs[0])
        assert outs[2 * i + 1].outputs[0].token_ids == alone.outputs[0].token_ids
