"""Llama 3.1+ JSON tool calls: an optional ``<|python_tag|>``, then one or more
``{"name": ..., "arguments"|"parameters": {...}}`` objects separated by ``;``. Without the
tag, only output that starts with ``{`` is read as calls."""

from __future__ import annotations

from aphrodite.frontend.tool_parsers.base import partial_marker_length
from aphrodite.frontend.tool_parsers.calls import CallRegions
from aphrodite.frontend.tool_parsers.json_call import CallObjectScanner

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(CallRegions):
    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def __init__(self) -> None:
        super().__init__()
        self._state = "start"     # start, content, call, between

    def _consume(self, text: str, final: bool) -> int | None:
        if self._state == "start":
            rest = text.lstrip()
            spaces = len(text) - len(rest)
            if rest.startswith(PYTHON_TAG):
                return self._open(PYTHON_TAG, spaces + len(PYTHON_TAG))
            if rest.startswith("{"):
                return self._open("", spaces) or None
            if not final and PYTHON_TAG.startswith(rest):
                return 0
            self._state = "content"
            return None
        if self._state == "call":
            used = self._scan(text)
            if self._scanner is None:
                self._state = "content"
            elif self._scanner.state == "done":
                self._scanner, self._state = None, "between"
            return used
        if self._state == "between":
            rest = text.lstrip()
            spaces = len(text) - len(rest)
            if rest.startswith(";"):
                return self._open("", spaces + 1)
            if not rest and not final:
                return 0
            self._state = "content"
            return spaces if spaces else None
        start = text.find(PYTHON_TAG)
        if start >= 0:
            self._content(text[:start])
            return self._open(PYTHON_TAG, start + len(PYTHON_TAG))
        keep = 0 if final else partial_marker_length(text, (PYTHON_TAG,))
        self._content(text[:len(text) - keep])
        return len(text) - keep

    def _open(self, raw_prefix: str, used: int) -> int:
        self._open_region(CallObjectScanner(), raw_prefix)
        self._state = "call"
        return used

    def _end(self) -> None:
        self._close_region_at_end()
