"""Incremental detokenisation against the tokenizer's own full-sequence decode."""

from __future__ import annotations

import pytest

from aphrodite.frontend.detokenizer import RequestDetokenizer
from aphrodite.model_files import load_tokenizer, resolve_model
from aphrodite.sampling_params import SamplingParams

TEXTS = [
    "Hello, world! This is a plain sentence.",
    "héllo 日本語 🐉 naïve café — «quotes» 👩‍👩‍👧 done",
    "Emoji at the end 🐉🐉",
    "Ελληνικά και русский текст, 한국어도.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


class _DecodeOnly:
    """The tokenizer seen through `decode` alone, which forces the offset-based path."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=True):
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _stream(detok: RequestDetokenizer, ids, chunk=1, ends_with_stop_token=False):
    deltas = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        last = start + chunk >= len(ids)
        delta, stop = detok.add_tokens(part, ends_with_stop_token=ends_with_stop_token and last)
        deltas.append(delta)
        if stop is not None:
            break
    deltas.append(detok.finish())
    return deltas


def _prompt(tokenizer):
    return tokenizer.encode("Say something:")


@pytest.mark.parametrize("fast", [True, False], ids=["decode_stream", "offsets"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_full_decode_without_replacement_chars(tokenizer, fast, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    tok = tokenizer if fast else _DecodeOnly(tokenizer)
    detok = RequestDetokenizer(tok, _prompt(tokenizer), SamplingParams())
    deltas = _stream(detok, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert detok.token_ids == ids


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_chunked_tokens_give_same_text(tokenizer, chunk):
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    detok = RequestDetokenizer(tokenizer, _prompt(tokenizer), SamplingParams())
    assert "".join(_stream(detok, ids, chunk=chunk)) == tokenizer.decode(ids)


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("before<|im_end|>after<|im_start|>", add_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    assert special & set(ids)
    for skip in (True, False):
        detok = RequestDetokenizer(tokenizer, _prompt(tokenizer), SamplingParams(skip_special_tokens=skip))
        text = "".join(_stream(detok, ids))
        assert text == tokenizer.decode(ids, skip_special_tokens=skip)
        assert ("<|im_end|>" in text) is (not skip)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer, include):
    text = "The quick brown fox jumps over the lazy dog and keeps running"
    stop = "s over th"
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
    detok = RequestDetokenizer(tokenizer, _prompt(tokenizer), params)
    deltas = _stream(detok, ids)
    cut = text.index(stop) + (len(stop) if include else 0)
    assert "".join(deltas) == text[:cut] == detok.text
    assert detok.stop_string == stop
    # Generation stops at the token completing the match, not later.
    assert len(detok.token_ids) < len(ids)
    assert tokenizer.decode(detok.token_ids).find(stop) >= 0
    assert stop not in tokenizer.decode(detok.token_ids[:-1])


def test_hold_back_never_emits_a_stop_prefix_that_is_later_cut(tokenizer):
    text = "alpha beta gamma delta epsilon"
    stop = "gamma delta"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = RequestDetokenizer(tokenizer, _prompt(tokenizer), SamplingParams(stop=[stop, "zz"]))
    emitted = ""
    for token_id in ids:
        delta, matched = detok.add_tokens([token_id])
        emitted += delta
        # Whatever was emitted is final: a prefix of the text that survives the cut.
        assert "alpha beta ".startswith(emitted)
        if matched:
            break
    emitted += detok.finish()
    assert emitted == "alpha beta "


def test_held_back_text_is_flushed_when_no_stop_matches(tokenizer):
    text = "no stop string appears in this sentence"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stop = "a much longer stop string"
    detok = RequestDetokenizer(tokenizer, _prompt(tokenizer), SamplingParams(stop=[stop]))
    streamed = ""
    for token_id in ids:
        streamed += detok.add_tokens([token_id])[0]
    assert streamed == text[:len(text) - (len(stop) - 1)]
    assert streamed + detok.finish() == text
    assert detok.stop_string is None


@pytest.mark.parametrize("include", [False, True])
def test_final_stop_token_text_dropped_unless_included(tokenizer, include):
    ids = tokenizer.encode("answer<|im_end|>", add_special_tokens=False)
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
    detok = RequestDetokenizer(tokenizer, _prompt(tokenizer), params)
    text = "".join(_stream(detok, ids, chunk=len(ids), ends_with_stop_token=True))
    assert text == ("answer<|im_end|>" if include else "answer")
    assert detok.token_ids == ids


def test_stop_strings_wait_for_min_tokens(tokenizer):
    text = "stop here, then more words and stop again at the end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    first_stop_token = next(i for i in range(1, len(ids) + 1) if "stop" in tokenizer.decode(ids[:i]))
    min_tokens = first_stop_token + 1
    params = SamplingParams(stop=["stop"], min_tokens=min_tokens, max_tokens=len(ids) + 1)
    detok = RequestDetokenizer(tokenizer, _prompt(tokenizer), params)
    out = "".join(_stream(detok, ids))
    assert out == text[:text.index("stop", 5)]
