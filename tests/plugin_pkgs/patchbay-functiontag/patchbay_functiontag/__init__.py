"""A third-party tool-call parser: calls written ``<function=NAME>{"arg": 1}</function>`` (Llama 3.1's custom
tool format), registered as ``function_tag``, with a grammar so that strict and required calls are held to
the tools' schemas. Built only on patchbay's kernel (``patchbay.tools``, ``patchbay.jsonprefix``)."""

from __future__ import annotations

import json
import re

from patchbay import hookimpl
from patchbay.jsonprefix import Incomplete, Invalid, skip_ws, value_end
from patchbay.registry import ToolParserSpec
from patchbay.tools import COMPACT_JSON, ParsedCall, ToolParse

OPEN = "<function="
CLOSE = "</function>"
NAME = re.compile(r"[A-Za-z0-9_-]*")


class FunctionTagParser:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def parse(self, text, final):
        start = text.find(OPEN)
        if start < 0:
            held = 0 if final else next((n for n in range(len(OPEN) - 1, 0, -1) if text.endswith(OPEN[:n])), 0)
            return ToolParse(text[: len(text) - held])
        calls = []
        pos = start
        while pos >= 0:
            i = pos + len(OPEN)
            end_name = NAME.match(text, i).end()
            if end_name >= len(text):
                calls.append(ParsedCall(None))
                break
            if text[end_name] != ">":
                return ToolParse(text) if final else ToolParse(text[:start], tuple(calls))
            body = skip_ws(text, end_name + 1)
            try:
                end = value_end(text, body, final)
            except Incomplete:
                calls.append(ParsedCall(text[i:end_name], text[body:]))
                break
            except Invalid:
                return ToolParse(text) if final else ToolParse(text[:start], tuple(calls))
            calls.append(ParsedCall(text[i:end_name], text[body:end], complete=True))
            pos = text.find(OPEN, end)
        if final:
            calls = [c for c in calls if c.complete]
        return ToolParse(text[:start], tuple(calls))

    def grammar(self, tools, *, allow_text, max_calls):
        rules = []
        for i, tool in enumerate(tools):
            schema = {**tool.parameters, "x-guidance": COMPACT_JSON}
            rules.append(f"call{i}: {json.dumps(OPEN + tool.name + '>')} %json {json.dumps(schema)} {json.dumps(CLOSE)}")
        call = "call: " + " | ".join(f"call{i}" for i in range(len(tools)))
        more = "" if max_calls == 1 else ("(WS call)*" if max_calls is None else f"(WS call){{0,{max_calls - 1}}}")
        if allow_text:
            head = [f"start: TEXT | opened body {more}", 'opened[lazy]: ANY "<function="', "TEXT: /(.|\\n)*/",
                    "ANY: /(.|\\n)*/",
                    "body: " + " | ".join(f"body{i}" for i in range(len(tools)))]
            head += [f"body{i}: {json.dumps(t.name + '>')} %json {json.dumps({**t.parameters, 'x-guidance': COMPACT_JSON})} "
                     f"{json.dumps(CLOSE)}" for i, t in enumerate(tools)]
        else:
            head = [f"start: call {more}"]
        return "\n".join(["%llguidance {}", *head, "WS: /[ \\n]{0,2}/", call, *rules]) + "\n"


@hookimpl
def register_tool_parsers(register):
    register(ToolParserSpec("function_tag", FunctionTagParser))
