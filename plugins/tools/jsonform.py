"""The calls' own JSON forms, used when a request's ``tool_choice`` is ``"required"`` or a named function and the
served model has no tool-call parser that can constrain its markup (as vLLM does it):

- a named function: the output *is* the arguments object (:class:`NamedArguments`);
- ``"required"``: the output is ``[{"name": ..., "parameters": {...}}, ...]`` (:class:`CallList`).

Both are tool-call parsers in the sense of :mod:`patchbay.tools`, but no plugin registers them: the
endpoints pick them. Their grammars hand the schemas to llguidance (``%json``), which enforces more of
JSON schema (numeric bounds among it) than a schema compiled to a regex. Not a plugin itself.
"""

from __future__ import annotations

from typing import Sequence

from patchbay.jsonprefix import Incomplete, Invalid, skip_ws, value_end
from patchbay.tools import COMPACT_JSON, FunctionTool, ParsedCall, ToolParse, calls_schema

from .markup import array_calls, finish, json_rule


class NamedArguments:
    def __init__(self, name: str):
        self.name = name

    def parse(self, text: str, final: bool) -> ToolParse:
        i = skip_ws(text, 0)
        if i == len(text):
            return ToolParse("", () if final else (ParsedCall(self.name),))
        try:
            end = value_end(text, i, final)
        except Incomplete:
            return ToolParse("", () if final else (ParsedCall(self.name, text[i:]),))
        except Invalid:
            return ToolParse("" if not final else text)
        if text[i] != "{" or (final and text[end:].strip()):
            return ToolParse(text if final else "")
        return ToolParse("", (ParsedCall(self.name, text[i:end], complete=True),))

    def grammar(self, tools: Sequence[FunctionTool], *, allow_text: bool, max_calls: int | None) -> str | None:
        """The arguments of the one tool (``tools`` holds only the named one)."""
        (tool,) = tools
        return f"%llguidance {{}}\nstart: {json_rule({**tool.parameters, 'x-guidance': COMPACT_JSON})}\n"


class CallList:
    def parse(self, text: str, final: bool) -> ToolParse:
        i = skip_ws(text, 0)
        if i == len(text):
            return ToolParse(text if final else "")
        if text[i] != "[":
            return ToolParse(text if final else "")
        calls, invalid = array_calls(text, i, final)
        return finish("", calls, text, final, invalid)

    def grammar(self, tools: Sequence[FunctionTool], *, allow_text: bool, max_calls: int | None) -> str | None:
        call = calls_schema(tools, arguments_key="parameters")
        array = {"type": "array", "items": {"anyOf": call.pop("anyOf")}, "minItems": 1, **call}
        if max_calls is not None:
            array["maxItems"] = max_calls
        return f"%llguidance {{}}\nstart: {json_rule(array)}\n"
