"""Scanning JSON that is still being written: where a value ends, or that it has not ended yet.

Tool-call parsers read a model's output while it streams. They need the span of a
call's ``"arguments"`` value in the raw text — not a re-serialisation, so that the
streamed pieces concatenate to exactly the final arguments — and they need to know
whether a value is malformed, complete, or merely unfinished. Strict JSON (RFC 8259):
no NaN, no single quotes, no trailing commas, no control characters in strings.

:func:`value_end` raises :class:`Incomplete` when the text ends inside the value and
:class:`Invalid` when it cannot be JSON whatever follows.
"""

from __future__ import annotations

import re

import attrs

WS = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
#: a number that may still grow: its text so far is a prefix of some number
_NUMBER_PREFIX = re.compile(r"-?(?:0|[1-9][0-9]*)?(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")
_LITERALS = ("true", "false", "null")


class Incomplete(Exception):
    """The text ends before the value does."""


class Invalid(ValueError):
    """The text cannot be the start of a JSON value."""


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WS:
        i += 1
    return i


def _need(text: str, i: int) -> None:
    if i >= len(text):
        raise Incomplete


def string_end(text: str, i: int) -> int:
    """The index after the string starting at ``text[i] == '"'``."""
    if text[i] != '"':
        raise Invalid(f"expected a string at {i}")
    j = i + 1
    while True:
        _need(text, j)
        c = text[j]
        if c == '"':
            return j + 1
        if c == "\\":
            _need(text, j + 1)
            esc = text[j + 1]
            if esc == "u":
                digits = text[j + 2 : j + 6]
                if not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise Invalid(f"bad \\u escape at {j}")
                if len(digits) < 4:
                    raise Incomplete
                j += 6
            elif esc in '"\\/bfnrt':
                j += 2
            else:
                raise Invalid(f"bad escape at {j}")
        elif ord(c) < 0x20:
            raise Invalid(f"control character in a string at {j}")
        else:
            j += 1


def value_end(text: str, i: int, final: bool = False) -> int:
    """The index after the JSON value starting at ``text[i]`` (no leading whitespace).

    ``final``: the text is complete, so a number running to its end is finished.
    """
    _need(text, i)
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c == "{":
        return _container_end(text, i, "}", final, keyed=True)
    if c == "[":
        return _container_end(text, i, "]", final, keyed=False)
    if c == "-" or c.isdigit():
        grown = _NUMBER_PREFIX.match(text, i).end()  # as far as some number could go
        if grown == len(text) and not final:
            raise Incomplete  # "12" may become "123", "1." may become "1.5"
        m = _NUMBER.match(text, i)
        if m is None or m.end() < grown:  # "-", "1.", "1e+" not followed by their digits
            raise Invalid(f"bad number at {i}")
        return m.end()
    for word in _LITERALS:
        if text.startswith(word, i):
            return i + len(word)
        if word.startswith(text[i:]):
            raise Incomplete
    raise Invalid(f"unexpected {c!r} at {i}")


def _container_end(text: str, i: int, close: str, final: bool, keyed: bool) -> int:
    j = skip_ws(text, i + 1)
    _need(text, j)
    if text[j] == close:
        return j + 1
    while True:
        if keyed:
            _need(text, j)
            j = string_end(text, j)
            j = skip_ws(text, j)
            _need(text, j)
            if text[j] != ":":
                raise Invalid(f"expected ':' at {j}")
            j = skip_ws(text, j + 1)
        j = skip_ws(text, value_end(text, j, final))
        _need(text, j)
        if text[j] == close:
            return j + 1
        if text[j] != ",":
            raise Invalid(f"expected ',' or {close!r} at {j}")
        j = skip_ws(text, j + 1)


@attrs.frozen
class CallObject:
    """What :func:`scan_call_object` found of ``{"name": ..., "arguments": {...}}``."""

    #: the name (None while its string is unfinished, or when there is no name key yet)
    name: str | None
    #: the raw text of the arguments value so far ("" before its key is seen)
    arguments: str
    #: the arguments value is complete
    arguments_done: bool
    #: the index after the closing brace; None while the object is open
    end: int | None


def scan_call_object(text: str, i: int, *, name_keys: tuple[str, ...] = ("name",),
                     argument_keys: tuple[str, ...] = ("arguments", "parameters"), final: bool = False) -> CallObject:
    """Scan a call object starting at ``text[i] == '{'``, as far as the text goes.

    Other keys are skipped. Raises :class:`Invalid` when the text cannot be such an
    object (not an object, a non-string name, arguments that are not an object).
    """
    import json

    if i >= len(text) or text[i] != "{":
        raise Invalid(f"expected an object at {i}")
    name: str | None = None
    args, args_done = "", False
    j = skip_ws(text, i + 1)
    try:
        _need(text, j)
        if text[j] == "}":
            return CallObject(name, args, args_done, j + 1)
        while True:
            _need(text, j)
            k_end = string_end(text, j)
            key = json.loads(text[j:k_end])
            j = skip_ws(text, k_end)
            _need(text, j)
            if text[j] != ":":
                raise Invalid(f"expected ':' at {j}")
            j = skip_ws(text, j + 1)
            start = j
            if key in argument_keys:
                _need(text, j)
                if text[j] != "{":
                    raise Invalid("the arguments must be a JSON object")
                try:
                    j = value_end(text, j, final)
                except Incomplete:
                    args = text[start:]
                    raise
                args, args_done = text[start:j], True
            elif key in name_keys:
                _need(text, j)
                if text[j] != '"':
                    raise Invalid("the name must be a string")
                j = string_end(text, j)
                name = json.loads(text[start:j])
            else:
                j = value_end(text, j, final)
            j = skip_ws(text, j)
            _need(text, j)
            if text[j] == "}":
                return CallObject(name, args, args_done, j + 1)
            if text[j] != ",":
                raise Invalid(f"expected ',' or '}}' at {j}")
            j = skip_ws(text, j + 1)
    except Incomplete:
        return CallObject(name, args, args_done, None)
