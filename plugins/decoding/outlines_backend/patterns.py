"""Regexes the outlines backend builds: for a choice, and for a JSON-schema ``pattern`` over the JSON text of
a string."""

from __future__ import annotations

import re
from typing import Any

from .._spec import rewrite_schema

_RUST_META = frozenset("\\.+*?()|[]{}^$#&-~")
_SAFE_CLASS = r'[^"\\\x00-\x1F]'


def _rust_escape(text: str) -> str:
    return "".join("\\" + c if c in _RUST_META else c for c in text)


def choice_regex(choices: list[str]) -> str:
    return "(?:" + "|".join(_rust_escape(c) for c in choices) + ")"


class PatternError(ValueError):
    """A ``pattern`` that cannot be made JSON-safe (the message names it)."""


def _class_char(c: int) -> str:
    ch = chr(c)
    if ch in "\\[]^-&~" or c < 0x20 or c == 0x7F:
        return f"\\x{{{c:X}}}"
    return ch


def _json_literal(c: int) -> str:
    """Regex for the JSON-string text of one character (escaped where JSON needs it)."""
    ch = chr(c)
    if ch == '"':
        return r'\\"'
    if ch == "\\":
        return r"\\\\"
    if c < 0x20:
        named = {0x08: "b", 0x09: "t", 0x0A: "n", 0x0C: "f", 0x0D: "r"}.get(c)
        return "\\\\" + named if named else f"\\\\u00{c:02x}"
    return _rust_escape(ch)


def json_safe_pattern(pattern: str) -> str:
    """A JSON-schema ``pattern`` rewritten as a regex over the *JSON text* of the string.

    outlines_core pastes ``pattern`` between the quotes of the string as is, so
    ``.`` or ``[^@]`` could emit a raw ``"``, ``\\`` or control character and break
    the JSON. Here every character class is intersected with what a JSON string
    may hold raw, and literal quotes, backslashes and control characters become
    their JSON escapes. ``\\d`` / ``\\w`` become their ASCII forms (what both
    Python and ECMA-262 accept). Anchors at the ends are dropped (outlines
    matches the whole string, a subset of JSON-schema's search semantics);
    lookaround, backreferences, word boundaries and inline flags are refused.
    """
    import re._constants as C  # noqa: N812
    import re._parser as P  # noqa: N812

    try:
        tree = P.parse(pattern)
    except re.error as e:
        raise PatternError(f"invalid pattern {pattern!r}: {e}") from None
    if tree.state.flags & ~(re.UNICODE | re.ASCII):
        raise PatternError(f"pattern {pattern!r}: inline flags are not supported")

    cats = {
        C.CATEGORY_DIGIT: "0-9", C.CATEGORY_WORD: "0-9A-Za-z_", C.CATEGORY_SPACE: r"\s",
        C.CATEGORY_NOT_DIGIT: r"\D", C.CATEGORY_NOT_WORD: r"\W", C.CATEGORY_NOT_SPACE: r"\S",
    }

    def klass(items: list) -> str:
        negate = False
        body = []
        for op, av in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                body.append(_class_char(av))
            elif op is C.RANGE:
                body.append(f"{_class_char(av[0])}-{_class_char(av[1])}")
            elif op is C.CATEGORY:
                body.append(cats[av])
            else:
                raise PatternError(f"pattern {pattern!r}: unsupported class item {op}")
        inner = ("^" if negate else "") + "".join(body)
        return f"[[{inner}]&&{_SAFE_CLASS}]"

    def seq(items: list, top: bool = False) -> str:
        out = []
        n = len(items)
        for k, (op, av) in enumerate(items):
            if op is C.LITERAL:
                out.append(_json_literal(av))
            elif op is C.NOT_LITERAL:
                out.append(f"[[^{_class_char(av)}]&&{_SAFE_CLASS}]")
            elif op is C.ANY:
                out.append(_SAFE_CLASS)
            elif op is C.IN:
                out.append(klass(av))
            elif op is C.BRANCH:
                out.append("(?:" + "|".join(seq(list(b)) for b in av[1]) + ")")
            elif op is C.SUBPATTERN:
                _group, add, dele, sub = av
                if add or dele:
                    raise PatternError(f"pattern {pattern!r}: inline flags are not supported")
                out.append("(?:" + seq(list(sub)) + ")")
            elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
                lo, hi, sub = av
                hi_s = "" if hi is C.MAXREPEAT else str(hi)
                out.append("(?:" + seq(list(sub)) + f"){{{lo},{hi_s}}}")
            elif op is C.AT:
                start = top and k == 0 and av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING)
                end = top and k == n - 1 and av in (C.AT_END, C.AT_END_STRING)
                if not (start or end):
                    raise PatternError(f"pattern {pattern!r}: anchors and word boundaries are only supported at its ends")
            else:
                raise PatternError(f"pattern {pattern!r}: {str(op).lower()} is not supported (lookaround, "
                                    "backreferences and possessive or atomic groups are not)")
        return "".join(out)

    return seq(list(tree), top=True)


def json_safe_patterns(schema: Any) -> Any:
    """A copy of ``schema`` with every string ``pattern`` made JSON-safe (see :func:`json_safe_pattern`)."""
    def entry(k: str, v: Any) -> tuple[str, Any] | None:
        return (k, json_safe_pattern(v)) if k == "pattern" and isinstance(v, str) else None

    return rewrite_schema(schema, entry)
