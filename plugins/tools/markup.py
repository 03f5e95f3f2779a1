"""What the marker-based tool-call formats share: holding back a half-written marker, reading a call object
between markers, and the grammar of tagged calls. Not a plugin itself; third-party parsers may import it."""

from __future__ import annotations

import json
from typing import Sequence

from patchbay.jsonprefix import Incomplete, Invalid, scan_call_object, skip_ws, value_end
from patchbay.tools import FunctionTool, ParsedCall, ToolParse, calls_schema


def partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker`` (0 when none)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def shown_content(text: str, markers: Sequence[str], final: bool) -> str:
    """``text`` (in which no marker starts) minus a trailing half-written marker unless ``final``."""
    if final:
        return text
    cut = max((partial_marker(text, m) for m in markers), default=0)
    return text[: len(text) - cut]


def read_call(segment: str, closed: bool, *, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall:
    """The call in ``segment`` (a JSON call object, maybe with whitespace around it); ``closed``: its closing
    marker follows. Raises :class:`patchbay.jsonprefix.Invalid` when it is not a call object; an unclosed one
    (the output may have been cut off) is returned as it is, not ``complete``."""
    i = skip_ws(segment, 0)
    if i == len(segment):
        if closed:
            raise Invalid("an empty tool call")
        return ParsedCall(None)
    obj = scan_call_object(segment, i, argument_keys=argument_keys, final=closed)
    if obj.end is None:
        if closed:
            raise Invalid("an unfinished tool call")
        return ParsedCall(obj.name, obj.arguments)
    if obj.name is None:
        raise Invalid("a tool call without a name")
    if segment[obj.end:].strip() and closed:
        raise Invalid("text after a tool call's object")
    return ParsedCall(obj.name, obj.arguments if obj.arguments_done else "{}", complete=True)


def finish(content: str, calls: list[ParsedCall], text: str, final: bool, invalid: bool) -> ToolParse:
    """The parse so far; of a whole output (``final``), complete calls only (a call cut off by the length limit
    is dropped), and an output with a malformed call block and no good one is content (as it would be with no
    parser)."""
    if not final:
        return ToolParse(content, tuple(calls))
    done = tuple(c for c in calls if c.complete)
    if not done and invalid:
        return ToolParse(text)
    return ToolParse(content, done)


def tagged_calls(text: str, final: bool, open_: str, close: str) -> ToolParse:
    """Calls written ``OPEN {json} CLOSE`` (any text between calls is dropped), content before the first."""
    start = text.find(open_)
    if start < 0:
        return ToolParse(shown_content(text, (open_,), final))
    calls: list[ParsedCall] = []
    invalid = False
    pos = start
    while pos >= 0:
        body = pos + len(open_)
        end = text.find(close, body)
        try:
            call = read_call(text[body: end if end >= 0 else len(text)], end >= 0)
        except Invalid:
            invalid = True
            if not final:
                break
        else:
            calls.append(call)
        if end < 0:
            break
        pos = text.find(open_, end + len(close))
    return finish(text[:start], calls, text, final, invalid)


def array_calls(text: str, i: int, final: bool) -> tuple[list[ParsedCall], bool]:
    """The calls of a JSON array of call objects starting at ``text[i] == '['``, and whether it is malformed."""
    calls: list[ParsedCall] = []
    j = skip_ws(text, i + 1)
    while j < len(text) and text[j] != "]":
        try:
            end = value_end(text, j, final)
        except Incomplete:
            end = None
        except Invalid:
            return calls, True
        try:
            calls.append(read_call(text[j: len(text) if end is None else end], end is not None))
        except Invalid:
            return calls, True
        if end is None:
            break
        j = skip_ws(text, end)
        if j < len(text) and text[j] == ",":
            j = skip_ws(text, j + 1)
        elif j < len(text) and text[j] != "]":
            return calls, True
    return calls, False


# --------------------------------------------------------------------------- grammars


def json_rule(schema: dict) -> str:
    return "%json " + json.dumps(schema)


def lark_string(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text)


def repeat(rule: str, sep: str, max_calls: int | None) -> str:
    """``rule`` once, then up to ``max_calls - 1`` more times (any number when None), each after ``sep``."""
    if max_calls == 1:
        return rule
    more = "*" if max_calls is None else f"{{0,{max_calls - 1}}}"
    return f"{rule} ({sep} {rule}){more}"


def tagged_grammar(tools: Sequence[FunctionTool], *, open_: str, close: str, allow_text: bool,
                   max_calls: int | None, before_body: str = "", after_body: str = "",
                   arguments_key: str = "arguments") -> str:
    """The grammar of ``OPEN before {call json} after CLOSE`` calls, separated and followed by a little
    whitespace. With ``allow_text`` any text not containing ``OPEN`` may come first, and the moment the
    model writes ``OPEN`` the rest is held to the calls (a lazy lexeme ending at the marker)."""
    body = json_rule(calls_schema(tools, arguments_key=arguments_key))
    call = f"call: {lark_string(before_body)} body {lark_string(after_body + close)}" if (before_body or after_body) \
        else f"call: body {lark_string(close)}"
    lines = [
        "%llguidance {}",
        f"SEP: /[ \\t\\n]{{0,2}}/ {lark_string(open_)}",
        "TAIL: /[ \\t\\n]{0,2}/",
        call,
        f"body: {body}",
    ]
    calls = repeat("call", "SEP", max_calls)
    if allow_text:
        lines[1:1] = [
            f"start: TEXT | opened {calls} TAIL",
            f"opened[lazy]: ANY {lark_string(open_)}",
            "TEXT: /(.|\\n)*/",
            "ANY: /(.|\\n)*/",
        ]
    else:
        lines[1:1] = [f"start: {lark_string(open_)} {calls} TAIL"]
    return "\n".join(lines) + "\n"
