"""The ``hermes`` tool-call parser (plugin ``hermes``): Hermes 2 Pro, Qwen2.5 and Qwen3 write each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

after any text; the content is the text before the first call.
"""

from __future__ import annotations

from typing import Any, Sequence

from patchbay import hookimpl
from patchbay.registry import ToolParserSpec
from patchbay.tools import FunctionTool, ToolParse

from .markup import tagged_calls, tagged_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser:
    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def parse(self, text: str, final: bool) -> ToolParse:
        return tagged_calls(text, final, OPEN, CLOSE)

    def grammar(self, tools: Sequence[FunctionTool], *, allow_text: bool, max_calls: int | None) -> str | None:
        return tagged_grammar(tools, open_=OPEN, close=CLOSE, allow_text=allow_text, max_calls=max_calls,
                              before_body="\n", after_body="\n")


@hookimpl
def register_tool_parsers(register):
    register(ToolParserSpec("hermes", HermesToolParser))
