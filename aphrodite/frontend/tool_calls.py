"""What a chat request's tools and tool_choice mean for generation.

``none`` renders the tools and never reads calls; ``auto`` generates freely and the
server's --tool-call-parser finds calls in the text; ``required`` and a named function are
enforced with a JSON-schema constraint built from the tools' parameters, so they work on
any model, with or without a parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aphrodite.frontend.args import ServerOptions
from aphrodite.frontend.errors import bad_request
from aphrodite.frontend.tool_parsers import TOOL_PARSERS, JsonArrayCalls, ToolParser
from aphrodite.frontend.tool_parsers.base import ParseResult, collect, is_json_object

_NAMED_USAGE = 'Correct usage: {"type": "function", "function": {"name": "<one of tools>"}}'
# A function without a parameters schema takes no arguments: only {} (an open object would
# let a small model ramble until max_tokens).
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ToolPlan:
    mode: str                              # "none", "auto", "required" or "named"
    tools: list[dict]                      # the definitions the chat template renders
    function_name: str | None = None       # the named function
    parser: type[ToolParser] | None = None
    parallel: bool = True
    # The JSON schema that forces the call (required and named), as structured_outputs.
    structured_outputs: dict | None = field(default=None)
    # Whose call ids to make: the server's parser's (Mistral wants 9 characters) in every mode.
    id_style: type[ToolParser] = ToolParser

    def new_call_id(self) -> str:
        return self.id_style.new_call_id()

    @property
    def reads_calls(self) -> bool:
        return self.mode != "none"

    def new_parser(self) -> ToolParser:
        if self.mode == "named":
            return NamedCall(self.function_name)
        if self.mode == "required":
            return JsonArrayCalls()
        return self.parser()

    def parse(self, text: str) -> ParseResult:
        if self.mode == "named":
            return NamedCall(self.function_name).parse_named(text)
        if self.mode == "required":
            result = complete_array_calls(text)
        else:
            result = self.parser.parse(text)
        if not self.parallel:
            result.calls = result.calls[:1]
        return result


def plan_tool_calls(body: Any, options: ServerOptions) -> ToolPlan | None:
    """The request's tool plan (None without tools); 400 naming the field when the tools
    or tool_choice cannot be served."""
    choice = body.tool_choice
    if body.tools is None:
        if choice is not None:
            raise bad_request("tool_choice is only allowed when tools are given.",
                              param="tool_choice")
        return None
    if not body.tools:
        raise bad_request("tools must not be an empty array; leave it out for no tools.",
                          param="tools")
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    parallel = body.parallel_tool_calls is not False
    id_style = TOOL_PARSERS.get(options.tool_call_parser or "", ToolParser)
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolPlan("none", tools, parallel=parallel, id_style=id_style)
    if choice == "auto":
        if not (options.enable_auto_tool_choice and options.tool_call_parser):
            raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and '
                              '--tool-call-parser to be set; send tool_choice "required", a '
                              'named function or "none" instead.', param="tool_choice")
        return ToolPlan("auto", tools, parser=TOOL_PARSERS[options.tool_call_parser],
                        parallel=parallel, id_style=id_style)
    if choice == "required":
        return ToolPlan("required", tools, parallel=parallel, id_style=id_style,
                        structured_outputs={"json": required_schema(body.tools, parallel)})
    name = choice.function.name
    tool = next((t for t in body.tools if t.function.name == name), None)
    if tool is None:
        raise bad_request(f"tool_choice names function {name!r}, which is not among tools. "
                          + _NAMED_USAGE, param="tool_choice")
    return ToolPlan("named", tools, function_name=name, parallel=parallel, id_style=id_style,
                    structured_outputs={"json": named_schema(tool)})


def special_token_texts(tokenizer: Any) -> set[str]:
    """The tokenizer's special tokens, which detokenising drops unless a request keeps them:
    a parser whose markers are among them needs skip_special_tokens off."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {token.content for token in added.values() if getattr(token, "special", False)}
    special.update(getattr(tokenizer, "all_special_tokens", None) or [])
    return special


def named_schema(tool: Any) -> dict:
    """The arguments object of one function: its parameters schema."""
    return tool.function.parameters or _NO_PARAMETERS


def required_schema(tools: list[Any], parallel: bool) -> dict:
    """A non-empty array of {"name", "parameters"} objects, one alternative per tool. Each
    tool's $defs move to the top level, where their "#/$defs/..." references point."""
    defs: dict[str, Any] = {}
    alternatives = []
    for tool in tools:
        parameters = dict(tool.function.parameters or _NO_PARAMETERS)
        for def_name, definition in (parameters.pop("$defs", None) or {}).items():
            if def_name in defs and defs[def_name] != definition:
                raise bad_request(f"Two tools define $defs {def_name!r} differently; give "
                                  "them distinct names.", param="tools")
            defs[def_name] = definition
        alternatives.append({
            "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                           "parameters": parameters},
            "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": alternatives}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def complete_array_calls(text: str) -> ParseResult:
    """The calls of a forced array whose JSON closed. The grammar keeps the array valid, so
    only max_tokens can cut it, and then inside its last call (a small model sampled at high
    temperature may keep adding calls): the finished calls are still the model's calls, the
    cut one is dropped. With no finished call the text comes back as content."""
    parser = JsonArrayCalls()
    _, calls = collect(parser.feed(text) + parser.finish())
    finished = [call for call in calls if is_json_object(call.arguments)]
    if not finished:
        return ParseResult(content=text.strip() or None)
    return ParseResult(content=None, calls=finished)


class NamedCall(ToolParser):
    """A forced named function: all generated text is its arguments."""

    def __init__(self, function_name: str) -> None:
        super().__init__()
        self.function_name = function_name

    def _consume(self, text: str, final: bool) -> int:
        if self.calls == 0:
            self._call_start(self.function_name)
        self._arguments(0, text)
        return len(text)

    def _end(self) -> None:
        if self.calls == 0:
            self._call_start(self.function_name)
            self._arguments(0, "{}")

    def parse_named(self, text: str) -> ParseResult:
        """The whole output; broken JSON (cut off by max_tokens) stays the call's
        arguments, as a client of a forced call expects a call."""
        events = self.feed(text) + self.finish()
        return ParseResult(content=None, calls=collect(events)[1])
