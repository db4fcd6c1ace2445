"""What every tool-call parser shares: the events a stream of text turns into, holding back
text that may be the start of a marker, and the whole-output parse built on the stream."""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class ContentDelta:
    text: str


@dataclass
class CallStart:
    index: int
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str


Event = ContentDelta | CallStart | ArgumentsDelta


@dataclass
class ParsedCall:
    name: str
    arguments: str      # JSON text of the arguments object, as the model wrote it


@dataclass
class ParseResult:
    content: str | None                 # the text around the calls; None when there is none
    calls: list[ParsedCall] = field(default_factory=list)


def partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the start of a marker (held back
    until the next text decides)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


class ToolParser:
    """Turns a model's output, fed as text deltas, into content and tool-call events.

    One instance per generated sequence. Subclasses implement ``_consume`` (called with all
    text not yet consumed; returns how much it consumed) and may override ``_end``."""

    name: ClassVar[str] = ""
    # Marker texts that tokenizers may keep as special tokens (then they must be detokenised).
    markers: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._buffer = ""
        self._events: list[Event] = []
        self._pending_space = ""
        self._content_started = False
        self.calls = 0
        self.failed = False          # a call's JSON broke after its name had been sent

    @staticmethod
    def new_call_id() -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        self._run(final=True)
        self._end()
        if self._buffer:
            self._content(self._buffer)
            self._buffer = ""
        return self._take()

    @classmethod
    def parse(cls, text: str) -> ParseResult:
        """The whole output at once. A call whose JSON is broken makes the whole text
        content: a client gets the model's words rather than a call it cannot use."""
        parser = cls()
        events = parser.feed(text) + parser.finish()
        content, calls = collect(events)
        if parser.failed or not all(is_json_object(call.arguments) for call in calls):
            stripped = text.strip()
            return ParseResult(content=stripped or None)
        return ParseResult(content=content or None, calls=calls)

    def _run(self, final: bool) -> None:
        while self._buffer:
            used = self._consume(self._buffer, final)
            if used is None:        # the state changed without consuming: look again
                continue
            if used == 0:           # waiting for more text
                break
            self._buffer = self._buffer[used:]

    # ---- for subclasses ------------------------------------------------------------------
    def _consume(self, text: str, final: bool) -> int | None:
        raise NotImplementedError

    def _end(self) -> None:
        """The output ended (called after the last _consume)."""

    def _content(self, text: str) -> None:
        """Content text; whitespace at either end of the content (around the calls) is
        dropped, so streamed content joins to the whole-output content."""
        if not self._content_started:
            text = text.lstrip()
        if not text:
            return
        body = text.rstrip()
        if body:
            self._events.append(ContentDelta(self._pending_space + body))
            self._pending_space = ""
            self._content_started = True
        self._pending_space += text[len(body):]

    def _call_start(self, name: str) -> int:
        self._events.append(CallStart(self.calls, name))
        self.calls += 1
        self._pending_space = ""
        return self.calls - 1

    def _arguments(self, index: int, text: str) -> None:
        if text:
            self._events.append(ArgumentsDelta(index, text))

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events


def collect(events: list[Event]) -> tuple[str, list[ParsedCall]]:
    """Content text and calls from a list of events."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, ParsedCall] = {}
    for event in events:
        if isinstance(event, CallStart):
            calls[event.index] = ParsedCall(event.name, "")
        elif isinstance(event, ArgumentsDelta):
            calls[event.index].arguments += event.text
    return content, [calls[i] for i in sorted(calls)]


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def mistral_call_id() -> str:
    """Mistral's tokenizers take 9 alphanumeric characters as a call id."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(9))
