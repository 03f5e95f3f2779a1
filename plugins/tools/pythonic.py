"""The ``pythonic`` tool-call parser (plugin ``pythonic``): Llama 3.2 / 4 and others answer calls as a Python list
of calls with literal keyword arguments,

    [get_weather(city="Paris", unit="celsius"), get_time(zone="CET")]

(Llama 4 may wrap it in ``<|python_start|>`` ... ``<|python_end|>``). An output that is such a list is calls;
anything else is content. Arguments become JSON objects; a call's arguments are sent whole once the call is
closed (they are not JSON while being written). Python literals cannot be held to a JSON schema by a grammar,
so this format is not constrained (:meth:`PythonicToolParser.grammar` is None).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Sequence

from patchbay import hookimpl
from patchbay.registry import ToolParserSpec
from patchbay.tools import FunctionTool, ParsedCall, ToolParse

from .markup import partial_marker

START, END = "<|python_start|>", "<|python_end|>"
_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\(")


class PythonicToolParser:
    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def parse(self, text: str, final: bool) -> ToolParse:
        body = text.strip()
        if body.startswith(START):
            body = body[len(START):].strip()
        elif not final and body and partial_marker(body, START) == len(body):
            return ToolParse("")
        if body.endswith(END):
            body = body[: -len(END)].rstrip()
        if not body:
            return ToolParse(text if final else "")
        if body[0] != "[":
            return ToolParse(text)
        calls, closed = _calls(body)
        if calls is None:
            return ToolParse(text) if final else ToolParse("", ())
        if final:  # a list cut off by the length limit keeps its finished calls
            return ToolParse("", tuple(c for c in calls if c.complete))
        return ToolParse("", tuple(calls))

    def grammar(self, tools: Sequence[FunctionTool], *, allow_text: bool, max_calls: int | None) -> str | None:
        return None


def _calls(body: str) -> tuple[list[ParsedCall] | None, bool]:
    """The calls of ``[f(a=1), g()]`` so far (the last one unfinished: name only) and whether the list is
    closed; None when it is not a list of calls."""
    calls: list[ParsedCall] = []
    i = 1
    while True:
        while i < len(body) and body[i] in " \t\n,":
            i += 1
        if i >= len(body):
            return calls, False
        if body[i] == "]":
            return (calls, True) if not body[i + 1:].strip() else (None, False)
        m = _CALL.match(body, i)
        if m is None:
            return (calls, False) if re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_.]*\s*", body[i:]) else (None, False)
        end = _call_end(body, m.end())
        if end is None:
            calls.append(ParsedCall(m.group(1)))
            return calls, False
        arguments = _arguments(body[i:end])
        if arguments is None:
            return None, False
        calls.append(ParsedCall(m.group(1), arguments, complete=True))
        i = end


def _call_end(body: str, i: int) -> int | None:
    """The index after the ``)`` closing a call whose arguments start at ``i`` (None: not closed yet)."""
    depth, quote = 1, ""
    while i < len(body):
        c = body[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _arguments(call: str) -> str | None:
    """The keyword arguments of one call as a JSON object (None: not literal keyword arguments)."""
    try:
        node = ast.parse(call.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or node.args:
        return None
    out = {}
    for kw in node.keywords:
        if kw.arg is None:
            return None
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            return None
    try:
        return json.dumps(out, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # sets, bytes, complex, NaN: not JSON
        return None


@hookimpl
def register_tool_parsers(register):
    register(ToolParserSpec("pythonic", PythonicToolParser))
