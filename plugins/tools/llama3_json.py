"""The ``llama3_json`` tool-call parser (plugin ``llama3_json``): Llama 3.1 / 3.2 answer a call with JSON alone,

    {"name": "get_weather", "parameters": {"city": "Paris"}}

several joined by ``; ``, sometimes after ``<|python_tag|>``. An output that starts with ``{`` is calls;
any other output is content.
"""

from __future__ import annotations

from typing import Any, Sequence

from patchbay import hookimpl
from patchbay.jsonprefix import Invalid, scan_call_object, skip_ws
from patchbay.registry import ToolParserSpec
from patchbay.tools import FunctionTool, ParsedCall, ToolParse, calls_schema

from .markup import finish, json_rule, partial_marker, repeat

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"


class Llama3JsonToolParser:
    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def parse(self, text: str, final: bool) -> ToolParse:
        start = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, start):
            start = skip_ws(text, start + len(PYTHON_TAG))
        elif not final and start < len(text) and partial_marker(text, PYTHON_TAG) == len(text) - start:
            return ToolParse("")  # "<|pyth" may be the tag
        if start == len(text):
            return ToolParse(text if final else "")
        if text[start] != "{":
            return ToolParse(text)
        calls: list[ParsedCall] = []
        invalid = False
        i = start
        while i < len(text):
            try:
                obj = scan_call_object(text, i, final=final)
            except Invalid:
                invalid = True
                break
            if obj.end is None:  # still being written, or cut off
                calls.append(ParsedCall(obj.name, obj.arguments))
                break
            if obj.name is None:
                invalid = True
                break
            calls.append(ParsedCall(obj.name, obj.arguments if obj.arguments_done else "{}", complete=True))
            i = skip_ws(text, obj.end)
            if i < len(text) and text[i] == SEPARATOR:
                i = skip_ws(text, i + 1)
            elif i < len(text):
                invalid = True
                break
        return finish("", calls, text, final, invalid)

    def grammar(self, tools: Sequence[FunctionTool], *, allow_text: bool, max_calls: int | None) -> str | None:
        body = json_rule(calls_schema(tools, arguments_key="parameters"))
        calls = repeat("body", '"; "', max_calls)
        start = f'start: "" | TEXT | {calls}' if allow_text else f"start: {calls}"
        return "\n".join(["%llguidance {}", start, "TEXT: /[^{ \\t\\n](.|\\n)*/", f"body: {body}"]) + "\n"


@hookimpl
def register_tool_parsers(register):
    register(ToolParserSpec("llama3_json", Llama3JsonToolParser))
