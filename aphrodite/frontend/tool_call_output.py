"""A chat choice's tool calls in OpenAI's response shapes: the message of a whole response
and the deltas of a stream."""

from __future__ import annotations

from aphrodite.frontend.tool_calls import ToolPlan
from aphrodite.frontend.tool_parsers import ArgumentsDelta, CallStart, ContentDelta


def finish_reason(plan: ToolPlan, engine_reason: str | None, found_calls: bool) -> str | None:
    """OpenAI's finish_reason: "stop" for a forced named function, "tool_calls" when calls
    were found, else the engine's reason (a call cut off by max_tokens stays "length")."""
    if engine_reason == "length" or engine_reason is None:
        return engine_reason
    if plan.mode == "named":
        return "stop"
    return "tool_calls" if found_calls else engine_reason


def message_fields(plan: ToolPlan, text: str, engine_reason: str | None
                   ) -> tuple[dict, str | None]:
    """(content and tool_calls of the message, finish_reason) for the whole output."""
    result = plan.parse(text)
    calls = [{"id": plan.new_call_id(), "type": "function",
              "function": {"name": call.name, "arguments": call.arguments}}
             for call in result.calls]
    fields: dict = {"content": result.content}
    if calls:
        fields["tool_calls"] = calls
    return fields, finish_reason(plan, engine_reason, bool(calls))


class StreamedToolCalls:
    """One choice's stream: text deltas in, OpenAI delta objects out."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.parser = plan.new_parser()
        self.found_calls = False

    def deltas(self, text: str, final: bool) -> list[dict]:
        events = self.parser.feed(text) if text else []
        if final:
            events += self.parser.finish()
        out: list[dict] = []
        for event in events:
            if isinstance(event, ContentDelta):
                if out and "content" in out[-1]:
                    out[-1]["content"] += event.text
                else:
                    out.append({"content": event.text})
                continue
            if event.index > 0 and not self.plan.parallel:
                continue    # parallel_tool_calls false: the first call only
            if isinstance(event, CallStart):
                self.found_calls = True
                out.append({"tool_calls": [{
                    "index": event.index, "id": self.plan.new_call_id(), "type": "function",
                    "function": {"name": event.name, "arguments": ""}}]})
            elif isinstance(event, ArgumentsDelta):
                last = out[-1]["tool_calls"][0] if out and "tool_calls" in out[-1] else None
                if last is not None and last["index"] == event.index \
                        and "id" not in last:
                    last["function"]["arguments"] += event.text
                else:
                    out.append({"tool_calls": [{"index": event.index,
                                                "function": {"arguments": event.text}}]})
        return out

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return finish_reason(self.plan, engine_reason, self.found_calls)
