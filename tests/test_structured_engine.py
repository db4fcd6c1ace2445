"""Structured outputs through the whole engine (offline LLM -> engine core -> worker) on the
default model: outputs checked with jsonschema, re.fullmatch and the choice list; a grammar
that admits any text against the unconstrained engine's own greedy tokens; seeded rows alone
against inside a mixed batch; a KV pool small enough to preempt."""

import json
import re

import jsonschema
import pytest

from aphrodite import LLM, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = ["Describe a person.", "What is the capital of France?",
             "Give me three tips for learning to cook.", "Write a haiku about rain."]
# Closed and bounded, so that every output completes within max_tokens.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130}}}
BOOK = {"type": "object", "additionalProperties": False, "required": ["title", "fiction"],
        "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 20},
                       "pages": {"type": "integer", "minimum": 1, "maximum": 2000},
                       "fiction": {"type": "boolean"}}}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
COLOURS = ["red", "green", "dark blue"]


@pytest.fixture(scope="module")
def llm():
    # 16 blocks of 16 tokens: eight chats of ~40 prompt + 48 output tokens cannot all fit.
    with LLM(num_kv_blocks=16, max_num_seqs=8) as engine:
        yield engine


def chats(questions):
    return [[{"role": "user", "content": q}] for q in questions]


def constrained(constraint, **kw):
    kw.setdefault("max_tokens", 64)
    return SamplingParams(structured_outputs=constraint, **kw)


def check_json(schema, completion):
    assert completion.finish_reason == "stop", completion
    jsonschema.validate(json.loads(completion.text), schema)


def test_outputs_match_their_constraints_and_stop_when_complete(llm):
    params = [constrained({"json": PERSON}, temperature=0),
              constrained({"regex": PHONE}, temperature=0),
              constrained({"choice": COLOURS}, temperature=0),
              constrained({"json": BOOK}, temperature=0.8, seed=5)]
    outs = llm.chat(chats(QUESTIONS), params, use_tqdm=False)
    person, phone, colour, book = (o.outputs[0] for o in outs)
    check_json(PERSON, person)
    check_json(BOOK, book)
    assert re.fullmatch(PHONE, phone.text) and phone.finish_reason == "stop"
    assert colour.text in COLOURS and colour.finish_reason == "stop"
    # The grammar ended them: no EOS was sampled, and the last token is part of the text.
    for c in (person, phone, colour, book):
        assert llm.tokenizer.decode(c.token_ids) == c.text


def test_a_grammar_that_admits_anything_keeps_the_greedy_tokens(llm):
    free = llm.chat(chats(QUESTIONS), SamplingParams(temperature=0, max_tokens=32),
                    use_tqdm=False)
    anything = llm.chat(chats(QUESTIONS), constrained({"regex": r"(.|\n)*"}, temperature=0,
                                                      max_tokens=32), use_tqdm=False)
    for a, b in zip(free, anything):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason


def test_n4_samples_are_each_valid(llm):
    out = llm.chat(chats(QUESTIONS[:1]), constrained({"json": PERSON}, temperature=1.0, n=4,
                                                     seed=11), use_tqdm=False)[0]
    assert len(out.outputs) == 4
    for completion in out.outputs:
        check_json(PERSON, completion)


def test_mixed_batch_and_seeded_rows_are_batch_invariant(llm):
    seeded = constrained({"json": PERSON}, temperature=0.9, seed=1234)
    alone = llm.chat(chats(QUESTIONS[:1]), seeded, use_tqdm=False)[0].outputs[0]
    free_alone = llm.chat(chats(QUESTIONS[2:3]), SamplingParams(temperature=0, max_tokens=24),
                          use_tqdm=False)[0].outputs[0]
    params = [SamplingParams(temperature=0, max_tokens=24), seeded,
              constrained({"json": BOOK}, temperature=1.0, seed=3),
              SamplingParams(temperature=0, max_tokens=24)]
    outs = llm.chat(chats([QUESTIONS[2], QUESTIONS[0], QUESTIONS[1], QUESTIONS[2]]), params,
                    use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone.token_ids
    check_json(PERSON, alone)
    check_json(BOOK, outs[2].outputs[0])
    for i in (0, 3):                      # unconstrained rows are untouched by the masks
        assert outs[i].outputs[0].token_ids == free_alone.token_ids


def test_preempted_requests_keep_their_grammar(llm):
    before = llm.last_stats.num_preemptions
    questions = [f"Describe person number {i} in detail." for i in range(8)]
    params = [constrained({"json": PERSON} if i % 2 else {"regex": r"[A-Z][a-z ]{20,60}\."},
                          temperature=0.7, seed=i, max_tokens=64) for i in range(8)]
    outs = llm.chat(chats(questions), params, use_tqdm=False)
    assert llm.last_stats.num_preemptions > before
    for i, out in enumerate(outs):
        completion = out.outputs[0]
        if i % 2:
            check_json(PERSON, completion)
        else:
            assert re.fullmatch(r"[A-Z][a-z ]{20,60}\.", completion.text), completion


def test_a_grammar_the_engine_cannot_compile_fails_only_that_call(llm, monkeypatch):
    # The frontend's own check refuses this regex first; skip it to reach the engine.
    monkeypatch.setattr("aphrodite.llm.check_structured_outputs", lambda *args: None)
    with pytest.raises(ValueError, match="grammar"):
        llm.generate("Hello", constrained({"regex": "("}), use_tqdm=False)
    out = llm.generate("Hello", constrained({"choice": ["yes", "no"]}), use_tqdm=False)
    assert out[0].outputs[0].text in ("yes", "no")
