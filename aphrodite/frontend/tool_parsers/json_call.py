"""Scanners that find tool calls in JSON text arriving in pieces.

They track strings, escapes and nesting only, never parse partial JSON, and pass the
arguments' raw text on as it arrives: the streamed fragments of a call concatenate to
exactly the text a whole-output parse takes as its arguments.
"""

from __future__ import annotations

import json

_WHITESPACE = " \t\r\n"
ARGUMENT_KEYS = ("arguments", "parameters")


class JsonValueScanner:
    """Finds where one JSON value ends."""

    def __init__(self) -> None:
        self.kind: str | None = None      # "compound", "string" or "primitive"
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.done = False

    def step(self, c: str) -> bool:
        """Consumes c; False when c is not part of the value (it ends a number or literal)."""
        if self.kind is None:
            if c in "{[":
                self.kind, self.depth = "compound", 1
            elif c == '"':
                self.kind, self.in_string = "string", True
            else:
                self.kind = "primitive"
            return True
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
                self.done = self.kind == "string"
            return True
        if self.kind == "primitive":
            if c in ",}];" or c in _WHITESPACE:
                self.done = True
                return False
            return True
        if c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        return True


class CallObjectScanner:
    """One ``{"name": ..., "arguments"|"parameters": {...}}`` object.

    ``events`` collects ("name", name) once the name is known and then ("args", fragment)
    pieces; arguments that come before the name are held until it is known. A call without
    arguments gets "{}". ``error`` is set (and scanning stops) on anything else.
    """

    def __init__(self) -> None:
        self.state = "start"
        self.name: str | None = None
        self.events: list[tuple[str, str]] = []
        self.error: str | None = None
        self._key: str | None = None
        self._value: JsonValueScanner | None = None
        self._value_raw = ""
        self._args_seen = False
        self._args_held = ""
        self._args_out = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error")

    def feed(self, text: str) -> int:
        """Consumes text up to the end of the object; returns how many characters it used."""
        used = 0
        while used < len(text) and not self.finished:
            if self._step(text[used]):
                used += 1
        if self._args_out:
            self.events.append(("args", self._args_out))
            self._args_out = ""
        return used

    def end_of_text(self) -> None:
        """The text ended: a number or literal that was still open is complete."""
        if self.state == "value" and self._value.kind == "primitive":
            self._end_value()

    def _fail(self, why: str) -> bool:
        self.state, self.error = "error", why
        return True

    def _step(self, c: str) -> bool:    # True when c is consumed
        state = self.state
        if state in ("start", "key", "key_or_end", "colon", "after_value", "value_start") \
                and c in _WHITESPACE:
            return True
        if state == "start":
            return self._fail("a call must be a JSON object") if c != "{" else self._go("key_or_end")
        if state in ("key", "key_or_end"):
            if c == "}" and state == "key_or_end":
                return self._close()
            if c != '"':
                return self._fail("expected a key")
            self._value, self._value_raw = JsonValueScanner(), c
            self._value.step(c)
            return self._go("in_key")
        if state == "in_key":
            self._value.step(c)
            self._value_raw += c
            if self._value.done:
                self._key = json.loads(self._value_raw)
                self.state = "colon"
            return True
        if state == "colon":
            return self._go("value_start") if c == ":" else self._fail("expected ':'")
        if state == "value_start":
            self._value, self._value_raw = JsonValueScanner(), ""
            self.state = "value"
            if self._key in ARGUMENT_KEYS:
                if self._args_seen:
                    return self._fail("arguments given twice")
                self._args_seen = True
        if state in ("value", "value_start"):
            if not self._value.step(c):
                self._end_value()
                return False
            self._value_raw += c
            if self._key in ARGUMENT_KEYS and self._value.kind == "compound":
                self._pass_arguments(c)
            if self._value.done:
                self._end_value()
            return True
        if state == "after_value":
            if c == ",":
                return self._go("key")
            return self._close() if c == "}" else self._fail("expected ',' or '}'")
        return self._fail("unexpected text")

    def _go(self, state: str) -> bool:
        self.state = state
        return True

    def _pass_arguments(self, text: str) -> None:
        if self.name is None:
            self._args_held += text
        else:
            self._args_out += text

    def _end_value(self) -> None:
        self.state = "after_value"
        raw, kind = self._value_raw, self._value.kind
        if self._key == "name":
            name = json.loads(raw) if kind == "string" else None
            if not isinstance(name, str) or not name:
                self._fail("the name must be a non-empty string")
                return
            self.name = name
            self.events.append(("name", name))
            self._args_out += self._args_held
            self._args_held = ""
        elif self._key in ARGUMENT_KEYS and kind != "compound":
            if raw.strip() == "null":
                self._pass_arguments("{}")
            elif kind == "string":    # arguments sent as JSON text
                self._pass_arguments(json.loads(raw))
            else:
                self._fail("arguments must be an object")

    def _close(self) -> bool:
        if self.name is None:
            return self._fail("a call needs a name")
        if not self._args_seen:
            self._args_out += "{}"
        self.state = "done"
        return True


class CallArrayScanner:
    """A JSON array of call objects: ``[{"name": ..., "arguments": ...}, ...]``.

    ``events`` collects ("name", index, name) and ("args", index, fragment)."""

    def __init__(self) -> None:
        self.state = "start"
        self.events: list[tuple[str, int, str]] = []
        self.error: str | None = None
        self.count = 0
        self._call: CallObjectScanner | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error")

    def feed(self, text: str) -> int:
        used = 0
        while used < len(text) and not self.finished:
            c = text[used]
            if self.state == "item":
                used += self._feed_call(text[used:])
                continue
            used += 1
            if c in _WHITESPACE:
                continue
            if self.state == "start":
                self.state = "item_or_end" if c == "[" else "error"
            elif self.state in ("item_or_end", "item_start"):
                if c == "]" and self.state == "item_or_end":
                    self.state = "done"
                else:
                    self._call = CallObjectScanner()
                    self.count += 1
                    self.state = "item"
                    used -= 1
            elif self.state == "after_item":
                self.state = {",": "item_start", "]": "done"}.get(c, "error")
        if self.state == "error" and self.error is None:
            self.error = "expected a JSON array of calls"
        return used

    def end_of_text(self) -> None:
        if self._call is not None:
            self._call.end_of_text()
            self._take_events()

    def _feed_call(self, text: str) -> int:
        used = self._call.feed(text)
        self._take_events()
        if self._call.state == "error":
            self.state, self.error = "error", self._call.error
        elif self._call.state == "done":
            self.state, self._call = "after_item", None
        return used

    def _take_events(self) -> None:
        index = self.count - 1
        self.events.extend((kind, index, value) for kind, value in self._call.events)
        self._call.events.clear()
