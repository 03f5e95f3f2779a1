"""The ``mistral`` tool-call parser (plugin ``mistral``): Mistral models write calls after ``[TOOL_CALLS]``,
either as one JSON array (v0.3 tokenizers)

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

or one call per marker, the name then the arguments (v11 tokenizers, ``[ARGS]`` optional)

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}

The content is the text before the first marker. When ``[TOOL_CALLS]`` is a special token of the
tokenizer the endpoint keeps special tokens in the text (:attr:`MistralToolParser.keep_special_tokens`),
and the markup cannot be constrained (the structured-output backends never emit special tokens).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from patchbay import hookimpl
from patchbay.jsonprefix import Incomplete, Invalid, skip_ws, value_end
from patchbay.registry import ToolParserSpec
from patchbay.tools import FunctionTool, ParsedCall, ToolParse, calls_schema

from .markup import array_calls, finish, json_rule, shown_content

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.-]*")


class MistralToolParser:
    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer
        special = set(getattr(tokenizer, "all_special_tokens", None) or ())
        #: ``[TOOL_CALLS]`` is a special token: keep special tokens in the text to see it
        self.keep_special_tokens = MARKER in special

    def parse(self, text: str, final: bool) -> ToolParse:
        start = text.find(MARKER)
        if start < 0:
            return ToolParse(shown_content(text, (MARKER,), final))
        body = skip_ws(text, start + len(MARKER))
        if body < len(text) and text[body] == "[":
            calls, invalid = array_calls(text, body, final)
        else:
            calls, invalid = _named_calls(text, start, final)
        return finish(text[:start], calls, text, final, invalid)

    def grammar(self, tools: Sequence[FunctionTool], *, allow_text: bool, max_calls: int | None) -> str | None:
        if self.keep_special_tokens:
            return None
        call = calls_schema(tools)
        array = {"type": "array", "items": {"anyOf": call.pop("anyOf")}, "minItems": 1, **call}
        if max_calls is not None:
            array["maxItems"] = max_calls
        lines = ["%llguidance {}", f"body: {json_rule(array)}"]
        if allow_text:
            lines[1:1] = ['start: TEXT | opened body', f"opened[lazy]: ANY {json.dumps(MARKER)}",
                          "TEXT: /(.|\\n)*/", "ANY: /(.|\\n)*/"]
        else:
            lines[1:1] = [f"start: {json.dumps(MARKER)} body"]
        return "\n".join(lines) + "\n"


def _named_calls(text: str, start: int, final: bool) -> tuple[list[ParsedCall], bool]:
    """``[TOOL_CALLS]name[ARGS]{...}`` (``[ARGS]`` optional), repeated."""
    calls: list[ParsedCall] = []
    pos = start
    while pos >= 0:
        i = pos + len(MARKER)
        name_end = _NAME.match(text, i).end()
        name = text[i:name_end]
        j = name_end + len(ARGS) if text.startswith(ARGS, name_end) else name_end
        if j >= len(text) or (j == name_end and ARGS.startswith(text[name_end:]) and text[name_end:]):
            calls.append(ParsedCall(None))  # the name may still grow (or was cut off)
            break
        if text[j] != "{" or not name:
            return calls, True
        try:
            end = value_end(text, j, final)
        except Incomplete:
            calls.append(ParsedCall(name, text[j:]))
            break
        except Invalid:
            return calls, True
        calls.append(ParsedCall(name, text[j:end], complete=True))
        pos = text.find(MARKER, end)
    return calls, False


@hookimpl
def register_tool_parsers(register):
    register(ToolParserSpec("mistral", MistralToolParser))
