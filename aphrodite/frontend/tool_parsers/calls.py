"""Call bodies that several formats share: one JSON call object, and a JSON array of them."""

from __future__ import annotations

from aphrodite.frontend.tool_parsers.base import ToolParser
from aphrodite.frontend.tool_parsers.json_call import CallArrayScanner, CallObjectScanner


class CallRegions(ToolParser):
    """Runs a call scanner over the text of one call region and turns its events into
    parser events. A region whose JSON breaks before any call name was sent becomes content
    (markup and all); after a name was sent it cannot be taken back, so the parser is
    marked failed and the whole-output parse gives the text as content."""

    def __init__(self) -> None:
        super().__init__()
        self._scanner: CallObjectScanner | CallArrayScanner | None = None
        self._region_raw = ""
        self._region_calls = 0
        self._indices: dict[int, int] = {}

    def _open_region(self, scanner, raw_prefix: str = "") -> None:
        self._scanner, self._region_raw, self._region_calls = scanner, raw_prefix, 0
        self._indices = {}

    def _scan(self, text: str) -> int:
        """Feeds the open region; returns the characters used."""
        used = self._scanner.feed(text)
        self._region_raw += text[:used]
        self._take_scanner_events()
        if self._scanner.state == "error":
            self._give_up()
        return used

    def _close_region_at_end(self) -> None:
        """The output ended inside a region."""
        if self._scanner is None:
            return
        self._scanner.end_of_text()
        self._take_scanner_events()
        if not self._scanner.finished:
            self._give_up()
        self._scanner = None

    def _give_up(self) -> None:
        if self._region_calls == 0:
            self._content(self._region_raw)
        else:
            self.failed = True
        self._scanner = None

    def _take_scanner_events(self) -> None:
        for event in self._scanner.events:
            if len(event) == 2:              # one object: (kind, value)
                kind, position, value = event[0], 0, event[1]
            else:
                kind, position, value = event
            if kind == "name":
                self._indices[position] = self._call_start(value)
                self._region_calls += 1
            else:
                self._arguments(self._indices[position], value)
        self._scanner.events.clear()


class JsonArrayCalls(CallRegions):
    """The output is a JSON array of ``{"name", "parameters"|"arguments"}`` objects (what
    tool_choice "required" forces)."""

    name = "json_array"

    def __init__(self) -> None:
        super().__init__()
        self._open_region(CallArrayScanner())

    def _consume(self, text: str, final: bool) -> int | None:
        if self._scanner is None:
            self._content(text)
            return len(text)
        used = self._scan(text)
        if self._scanner is not None and self._scanner.state == "done":
            self._scanner = None
        return used

    def _end(self) -> None:
        self._close_region_at_end()
