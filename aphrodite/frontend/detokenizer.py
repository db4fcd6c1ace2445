"""Incremental detokenisation and stop-string matching for one generated sequence.

Text is produced token by token without ever showing half a character: byte-level
BPE splits one emoji over several tokens, and decoding them one at a time would leak
U+FFFD. With a fast tokenizer the `tokenizers` DecodeStream does the buffering;
otherwise the prefix/read-offset method re-decodes a short window of recent tokens.

Stop strings are matched on the decoded text. While streaming, the last
len(longest stop) - 1 characters are held back (unless the stop string is to be
included in the output), because they may turn out to be the start of a stop string.

Plain synchronous code: the OutputProcessor keeps one per generated sequence.
"""

from __future__ import annotations

from typing import Any, Sequence

# Prompt tokens used to prime the decoder, so the first generated word gets the
# leading space a SentencePiece tokenizer would give it mid-sentence.
_PROMPT_CONTEXT_TOKENS = 6


class _StreamDecoder:
    """Wraps tokenizers' DecodeStream (fast tokenizers)."""

    def __init__(self, backend, prompt_tail: list[int], skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._skip = skip_special_tokens
        self._new_stream = lambda ids: DecodeStream(ids=ids, skip_special_tokens=skip_special_tokens)
        self._stream = self._new_stream(prompt_tail)

    def step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._backend, token_id) or ""
        except Exception as exc:  # the decoded prefix changed under a normaliser
            if "Invalid prefix" not in str(exc):
                raise
            self._stream = self._new_stream([])
            return self._stream.step(self._backend, token_id) or ""


class _OffsetDecoder:
    """Prefix/read-offset decoding for tokenizers without a `tokenizers` backend.

    Decodes ids[prefix:] and ids[prefix:read]; the difference is the new text, emitted
    only once it no longer ends in an incomplete character.
    """

    def __init__(self, tokenizer, prompt_tail: list[int], skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_tail)
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text):]


def backend_tokenizer(tokenizer) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer, or None."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


class RequestDetokenizer:
    """Turns one sequence's generated token ids into text, applying stop strings.

    `params` needs: stop (list of str or None), include_stop_str_in_output,
    skip_special_tokens, min_tokens (stop strings are not checked before that many
    output tokens, matching the engine's min_tokens handling of stop token ids).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params):
        self.stop_strings: list[str] = [s for s in (params.stop or []) if s]
        self.include_stop = bool(params.include_stop_str_in_output)
        self.min_tokens = int(getattr(params, "min_tokens", 0) or 0)
        skip = bool(getattr(params, "skip_special_tokens", True))
        prompt_tail = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        backend = backend_tokenizer(tokenizer)
        if backend is not None:
            self._decoder = _StreamDecoder(backend, prompt_tail, skip)
        else:
            self._decoder = _OffsetDecoder(tokenizer, prompt_tail, skip)
        longest = max((len(s) for s in self.stop_strings), default=0)
        self._hold_back = 0 if self.include_stop else max(longest - 1, 0)
        self.text = ""              # all text so far (cut at a stop string once matched)
        self.token_ids: list[int] = []
        self.stop_string: str | None = None
        self._emitted = 0           # characters of self.text already returned

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def add_tokens(self, token_ids: Sequence[int], ends_with_stop_token: bool = False
                   ) -> tuple[str, str | None]:
        """Adds new output tokens; returns (text safe to emit now, matched stop string).

        `ends_with_stop_token`: the engine finished the sequence on the last id (EOS or
        a stop token id); its text is dropped unless include_stop_str_in_output.
        Once a stop string has matched, further tokens are ignored.
        """
        if self.stopped:
            return "", self.stop_string
        decode_count = len(token_ids)
        if ends_with_stop_token and not self.include_stop and decode_count:
            decode_count -= 1
        for i, token_id in enumerate(token_ids):
            self.token_ids.append(token_id)
            if i >= decode_count:
                break
            piece = self._decoder.step(token_id)
            if not piece:
                continue
            self.text += piece
            if self.stop_strings and len(self.token_ids) >= self.min_tokens and self._check_stop(len(piece)):
                break
        return self._take(final=self.stopped), self.stop_string

    def finish(self) -> str:
        """Returns the held-back text at the end of the sequence."""
        return self._take(final=True)

    def _check_stop(self, new_chars: int) -> bool:
        for stop in self.stop_strings:
            # Only a match that involves the new characters can be new.
            start = max(0, len(self.text) - new_chars - len(stop) + 1)
            index = self.text.find(stop, start)
            if index >= 0:
                self.stop_string = stop
                self.text = self.text[:index + len(stop)] if self.include_stop else self.text[:index]
                return True
        return False

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._hold_back)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
