"""Mistral: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` objects, or the
newer ``[TOOL_CALLS]name[ARGS]{...}`` (repeated for parallel calls). Call ids are 9
alphanumeric characters, as Mistral's tokenizers require."""

from __future__ import annotations

import re

from aphrodite.frontend.tool_parsers.base import mistral_call_id, partial_marker_length
from aphrodite.frontend.tool_parsers.calls import CallRegions
from aphrodite.frontend.tool_parsers.json_call import CallArrayScanner, JsonValueScanner

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]*")
_LONGEST_NAME = 128


class MistralToolParser(CallRegions):
    name = "mistral"
    markers = (TOOL_CALLS, ARGS)
    new_call_id = staticmethod(mistral_call_id)

    def __init__(self) -> None:
        super().__init__()
        self._state = "content"   # content, marker, array, name, args
        self._args: JsonValueScanner | None = None
        self._call_index = 0

    def _consume(self, text: str, final: bool) -> int | None:
        state = self._state
        if state == "content":
            start = text.find(TOOL_CALLS)
            if start >= 0:
                self._content(text[:start])
                self._state = "marker"
                return start + len(TOOL_CALLS)
            keep = 0 if final else partial_marker_length(text, (TOOL_CALLS,))
            self._content(text[:len(text) - keep])
            return len(text) - keep
        if state == "marker":
            rest = text.lstrip()
            if not rest:
                return 0 if not final else self._to_content(TOOL_CALLS + text)
            self._state = "array" if rest[0] == "[" else "name"
            if self._state == "array":
                self._open_region(CallArrayScanner(), TOOL_CALLS)
            return len(text) - len(rest) or None
        if state == "array":
            used = self._scan(text)
            if self._scanner is None or self._scanner.state == "done":
                self._scanner, self._state = None, "content"
            return used
        if state == "name":
            return self._consume_name(text, final)
        return self._consume_arguments(text)

    def _consume_name(self, text: str, final: bool) -> int | None:
        """``name[ARGS]{``; text that breaks the form becomes content up to where it broke,
        so every split of the output reads the same."""
        run = _NAME_CHARS.match(text).end()
        rest = text[run:]
        if rest.startswith(ARGS):
            after = rest[len(ARGS):]
            body = after.lstrip()
            if not body and not final:
                return 0            # the arguments' first character decides
            if 0 < run <= _LONGEST_NAME and body.startswith("{"):
                self._call_index = self._call_start(text[:run])
                self._args, self._state = JsonValueScanner(), "args"
                return run + len(ARGS) + len(after) - len(body)
            return self._to_content(TOOL_CALLS + text[:run + len(ARGS)])
        if not final and run <= _LONGEST_NAME and ARGS.startswith(rest):
            return 0                # still the name, or a partial [ARGS]
        return self._to_content(TOOL_CALLS + text[:run])

    def _consume_arguments(self, text: str) -> int:
        used = 0
        while used < len(text) and not self._args.done:
            self._args.step(text[used])
            used += 1
        self._arguments(self._call_index, text[:used])
        if self._args.done:
            self._args, self._state = None, "content"
        return used

    def _to_content(self, text: str) -> int | None:
        """The marker (already consumed) and ``text`` after it are content."""
        self._content(text)
        self._state = "content"
        return len(text) - len(TOOL_CALLS) or None

    def _end(self) -> None:
        if self._state == "args":
            self.failed = True      # the arguments were cut off
        self._close_region_at_end()
