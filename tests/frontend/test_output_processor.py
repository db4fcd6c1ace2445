"""OutputProcessor on hand-written STEP_OUTPUTS frames and the default model's tokenizer.

Every expectation is written out: the text a tokenizer decode gives, the token ids and
logprob entries kept up to the token that completes a stop string, the engine ids to ABORT.
"""

from __future__ import annotations

import pytest

from aphrodite.frontend.output_processor import OutputProcessor
from aphrodite.model_files import load_tokenizer, resolve_model
from aphrodite.protocol import EngineOutput, EngineStats, StepOutputs
from aphrodite.sampling_params import SamplingParams

PROMPT = [36218, 42]                       # "Say:"
WORDS = [537, 827, 1296, 1876, 2531]       # "one", " two", " three", " four", " five"
EOS = 2                                    # "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer(resolve_model(None))
    assert tok.encode("one two three four five", add_special_tokens=False) == WORDS
    assert tok.eos_token_id == EOS
    return tok


def entry(token_id: int) -> dict:
    """A logprobs entry the test can recognise by its token."""
    return {"token_id": token_id, "logprob": -token_id / 1000, "rank": 1,
            "top_token_ids": [token_id], "top_logprobs": [-token_id / 1000]}


def output(engine_id, ids, finish=None, stop_reason=None, logprobs=True, cached=0, **extra):
    return EngineOutput(engine_id, ids, finish, stop_reason, cached,
                        [entry(t) for t in ids] if logprobs else None, **extra)


def step(*outputs: EngineOutput) -> StepOutputs:
    return StepOutputs(list(outputs), EngineStats(), 0.0)


def test_fan_out_gives_seeded_children_and_their_add_frames(tokenizer):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=3, seed=7, max_tokens=4, temperature=0.8)
    request, adds = processor.add_request("r", PROMPT, params, arrival_time=12.5)
    assert [a.request_id for a in adds] == ["r-0", "r-1", "r-2"]
    assert [a.sampling_params["seed"] for a in adds] == [7, 8, 9]
    assert all(a.prompt_token_ids == PROMPT and a.arrival_time == 12.5 for a in adds)
    assert all(SamplingParams.from_dict(a.sampling_params).temperature == 0.8 for a in adds)
    assert params.seed == 7                               # the caller's params are untouched
    assert [s.engine_id for s in request.sequences] == ["r-0", "r-1", "r-2"]
    assert processor.num_unfinished_sequences == 3
    _, unseeded = processor.add_request("u", PROMPT, SamplingParams(n=2))
    assert [a.sampling_params["seed"] for a in unseeded] == [None, None]
    with pytest.raises(ValueError, match="duplicate request id r"):
        processor.add_request("r", PROMPT, params)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_text_tokens_and_logprobs_and_asks_for_abort(tokenizer, include):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=20, stop=["ee f"], logprobs=1,
                            include_stop_str_in_output=include)
    request, _ = processor.add_request("r", PROMPT, params)
    seq = request.sequences[0]
    first = processor.process(step(output("r-0", WORDS[:2], cached=16)), now=1.0)
    assert first.abort_ids == [] and seq.finish_reason is None
    # " three four five" in one step: " four" completes "ee f", " five" comes after it.
    news = processor.process(step(output("r-0", WORDS[2:], cached=0)), now=2.0)
    assert news.abort_ids == ["r-0"]
    assert [(u.sequence.engine_id, u.num_new_tokens) for u in news.updates] == [("r-0", 3)]
    assert news.updates[0].previous_token_time == 1.0
    assert request.finished and processor.num_unfinished_sequences == 0
    delta = seq.take()
    assert delta.text == ("one two three f" if include else "one two thr")
    assert delta.token_ids == WORDS[:4]
    assert delta.logprobs == [entry(t) for t in WORDS[:4]]
    assert (delta.finish_reason, delta.stop_reason) == ("stop", "ee f")
    assert delta.num_cached_tokens == 16                 # as the first output said
    assert seq.take() is None
    # The engine's outputs until it sees the ABORT are ignored.
    assert processor.process(step(output("r-0", [EOS], "abort"))).updates == []


def test_stop_token_and_eos_end_without_their_text(tokenizer):
    processor = OutputProcessor(tokenizer)
    stop_token, _ = processor.add_request("t", PROMPT, SamplingParams(stop_token_ids=[1876]))
    eos, _ = processor.add_request("e", PROMPT, SamplingParams())
    news = processor.process(step(output("t-0", WORDS[:4], "stop", 1876),
                                  output("e-0", WORDS[:2] + [EOS], "stop", None)))
    assert news.abort_ids == []                           # the engine ended them itself
    by_stop_token, by_eos = stop_token.sequences[0].take(), eos.sequences[0].take()
    assert (by_stop_token.text, by_stop_token.token_ids) == ("one two three", WORDS[:4])
    assert (by_stop_token.finish_reason, by_stop_token.stop_reason) == ("stop", 1876)
    assert (by_eos.text, by_eos.token_ids) == ("one two", WORDS[:2] + [EOS])
    assert (by_eos.finish_reason, by_eos.stop_reason) == ("stop", None)
    assert by_eos.logprobs is None                        # not asked for


def test_a_completed_grammar_keeps_its_last_token_and_an_error_is_recorded(tokenizer):
    processor = OutputProcessor(tokenizer)
    done, _ = processor.add_request("g", PROMPT, SamplingParams())
    failed, _ = processor.add_request("x", PROMPT, SamplingParams())
    error = {"message": "no grammar", "status": 400, "param": "structured_outputs"}
    processor.process(step(output("g-0", WORDS[:3], "stop", grammar_complete=True),
                           output("x-0", [], "error", error=error)))
    delta = done.sequences[0].take()
    assert (delta.text, delta.token_ids, delta.finish_reason) == ("one two three", WORDS[:3],
                                                                  "stop")
    assert done.error is None and failed.error == error and failed.finished


def test_length_finish_flushes_held_back_text(tokenizer):
    processor = OutputProcessor(tokenizer)
    request, _ = processor.add_request("r", PROMPT, SamplingParams(stop=["a long stop"]))
    seq = request.sequences[0]
    processor.process(step(output("r-0", WORDS[:3])))
    held = seq.take()
    assert held.text == "one two three"[:-len("a long stop") + 1]   # may start a stop string
    processor.process(step(output("r-0", WORDS[3:], "length")))
    rest = seq.take()
    assert held.text + rest.text == "one two three four five"
    assert (rest.token_ids, rest.finish_reason, rest.stop_reason) == (WORDS[3:], "length", None)


def test_stop_strings_wait_for_min_tokens(tokenizer):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(stop=["two"], min_tokens=3, max_tokens=5)
    request, _ = processor.add_request("r", PROMPT, params)
    for token in WORDS:
        news = processor.process(step(output("r-0", [token], "length" if token == WORDS[-1]
                                             else None)))
        assert news.abort_ids == []
    delta = request.sequences[0].take()
    assert (delta.text, delta.finish_reason) == ("one two three four five", "length")
    later, _ = processor.add_request("s", PROMPT, SamplingParams(stop=["four"], min_tokens=3))
    for token in WORDS[:4]:
        news = processor.process(step(output("s-0", [token])))
    assert news.abort_ids == ["s-0"]
    assert later.sequences[0].take().text == "one two three "


def test_lagging_consumer_gets_merged_news_and_prompt_logprobs_once(tokenizer):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=2, seed=1, logprobs=0, prompt_logprobs=1)
    request, _ = processor.add_request("r", PROMPT, params)
    prompt_entries = [entry(42)]
    processor.process(step(output("r-0", WORDS[:1], prompt_logprobs=prompt_entries),
                           output("r-1", WORDS[1:2], prompt_logprobs=prompt_entries)))
    first, second = request.sequences
    news = processor.process(step(output("r-0", WORDS[1:2]), output("r-1", WORDS[2:3])))
    assert [u.previous_token_time is not None for u in news.updates] == [True, True]
    news = processor.process(step(output("r-1", WORDS[3:4], "length")))
    assert [u.sequence.index for u in news.updates] == [1]
    assert not request.finished
    merged = first.take()
    assert (merged.text, merged.token_ids) == ("one two", WORDS[:2])
    assert merged.logprobs == [entry(t) for t in WORDS[:2]]
    assert merged.prompt_logprobs == prompt_entries and merged.finish_reason is None
    other = second.take()
    assert (other.text, other.token_ids, other.finish_reason) == (" two three four", WORDS[1:4],
                                                                   "length")
    processor.process(step(output("r-0", WORDS[2:3], "length")))
    assert request.finished
    last = first.take()
    assert (last.text, last.prompt_logprobs, last.finish_reason) == (" three", None, "length")


def test_abort_and_forget(tokenizer):
    processor = OutputProcessor(tokenizer)
    request, _ = processor.add_request("r", PROMPT, SamplingParams(n=2))
    processor.process(step(output("r-0", WORDS[:1], "length")))
    assert processor.abort("r") == ["r-1"]                 # r-0 had finished
    assert processor.abort("r") == [] and processor.abort("unknown") == []
    assert [s.finish_reason for s in request.sequences] == ["length", "abort"]
    assert request.sequences[1].take().finish_reason == "abort"
    assert processor.num_unfinished_sequences == 0
    assert processor.process(step(output("r-1", WORDS[1:2]))).updates == []
    processor.forget("r")
    assert processor.requests == {}
    processor.add_request("r", PROMPT, SamplingParams())   # the id is free again
    processor.engine_gone()
    assert processor.num_unfinished_sequences == 0
