"""Hermes 2 Pro / Hermes 3 / Qwen2.5 style: ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``, possibly several; the text around the tags is content."""

from __future__ import annotations

from aphrodite.frontend.tool_parsers.base import partial_marker_length
from aphrodite.frontend.tool_parsers.calls import CallRegions
from aphrodite.frontend.tool_parsers.json_call import CallObjectScanner

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(CallRegions):
    name = "hermes"
    markers = (START, END)

    def __init__(self) -> None:
        super().__init__()
        self._closing = False     # a call object ended; its </tool_call> comes next

    def _consume(self, text: str, final: bool) -> int | None:
        if self._closing:
            return self._consume_end_tag(text, final)
        if self._scanner is not None:
            used = self._scan(text)
            if self._scanner is not None and self._scanner.state == "done":
                self._scanner, self._closing = None, True
            return used
        start = text.find(START)
        if start >= 0:
            self._content(text[:start])
            self._open_region(CallObjectScanner(), START)
            return start + len(START)
        keep = 0 if final else partial_marker_length(text, (START,))
        self._content(text[:len(text) - keep])
        return len(text) - keep

    def _consume_end_tag(self, text: str, final: bool) -> int | None:
        rest = text.lstrip()
        spaces = len(text) - len(rest)
        if rest.startswith(END):
            self._closing = False
            return spaces + len(END)
        if not final and END.startswith(rest):      # empty or a partial end tag
            return spaces if spaces else 0
        self._closing = False       # no end tag: the call stands, the rest is content
        return spaces if spaces else None

    def _end(self) -> None:
        self._close_region_at_end()
