"""Tool-call parsers by --tool-call-parser name."""

from aphrodite.frontend.tool_parsers.base import (ArgumentsDelta, CallStart, ContentDelta,
                                                  ParsedCall, ParseResult, ToolParser)
from aphrodite.frontend.tool_parsers.calls import JsonArrayCalls
from aphrodite.frontend.tool_parsers.hermes import HermesToolParser
from aphrodite.frontend.tool_parsers.llama3_json import Llama3JsonToolParser
from aphrodite.frontend.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)}

__all__ = ["TOOL_PARSERS", "ToolParser", "JsonArrayCalls", "ContentDelta", "CallStart",
           "ArgumentsDelta", "ParsedCall", "ParseResult"]
