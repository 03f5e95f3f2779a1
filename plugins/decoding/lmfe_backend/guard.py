"""The JSON guard: wraps lm-format-enforcer's JSON parser, tracks the JSON lexical state, and masks the
characters the library would wrongly allow (see the package docstring for the defects it fixes)."""

from __future__ import annotations

from functools import cache, lru_cache
from types import SimpleNamespace
from typing import Any

_WS = " \t\n\r"
_CONTROL = {c: None for c in range(0x20)}
_NO_WS = {ord(c): None for c in _WS}
_NO_FLOAT = {ord(c): None for c in ".eE"}
_NO_CLOSE = {ord(c): None for c in "}]"}
_TABLES = {"control": _CONTROL, "ws": _NO_WS, "float": _NO_FLOAT, "close": _NO_CLOSE}


@lru_cache(maxsize=512)
def _drop(chars: str, table_name: str) -> str:
    """``chars`` without the characters of one of the tables (memoized: the alphabets are long strings)."""
    return chars.translate(_TABLES[table_name])


@cache
def _types() -> SimpleNamespace:
    """The library's parser classes the guard looks into (imported on first use)."""
    from lmformatenforcer.characterlevelparser import UnionParser
    from lmformatenforcer.jsonschemaparser import JsonSchemaParser, NumberParsingState, StringParsingState

    return SimpleNamespace(JsonSchemaParser=JsonSchemaParser, NumberParsingState=NumberParsingState,
                           StringParsingState=StringParsingState, UnionParser=UnionParser)


def _leaves(parser: Any) -> list:
    """The parsers currently receiving characters (tops of the JSON stacks, through unions)."""
    types = _types()
    if isinstance(parser, types.JsonSchemaParser):
        return _leaves(parser.object_stack[-1]) if parser.object_stack else []
    if isinstance(parser, types.UnionParser):
        return [leaf for p in parser.parsers for leaf in _leaves(p)]
    return [parser]


class JsonGuard:
    """Wraps a JSON parser of lm-format-enforcer; tracks the JSON lexical state to fix its defects.

    Duck-types ``CharacterLevelParser`` (TokenEnforcer only calls these methods).
    """

    __slots__ = ("inner", "no_ws", "in_string", "escaped", "after_comma")

    def __init__(
        self, inner: Any, no_ws: bool, in_string: bool = False, escaped: bool = False, after_comma: bool = False
    ) -> None:
        self.inner = inner
        self.no_ws = no_ws
        self.in_string = in_string
        self.escaped = escaped
        #: the last character outside strings (whitespace aside) was a comma
        self.after_comma = after_comma

    @property
    def config(self) -> Any:
        return self.inner.config

    @config.setter
    def config(self, value: Any) -> None:
        self.inner.config = value

    def add_character(self, c: str) -> JsonGuard:
        in_s, esc, comma = self.in_string, self.escaped, self.after_comma
        if in_s:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_s = False
        elif c == '"':
            in_s, comma = True, False
        elif c not in _WS:
            comma = c == ","
        return JsonGuard(self.inner.add_character(c), self.no_ws, in_s, esc, comma)

    def _bounded_start(self) -> bool:
        """At the very start of a string with maxLength or a pattern (the library skips leading whitespace there)."""
        string_state = _types().StringParsingState
        return any(
            isinstance(p, string_state) and p.seen_opening_quote and not p.seen_closing_quote
            and not p.parsed_string and (p.max_length is not None or p.regex_parser is not None)
            for p in _leaves(self.inner)
        )

    def _short_string(self) -> bool:
        """Inside a string that has not reached its minLength yet."""
        string_state = _types().StringParsingState
        return any(
            isinstance(p, string_state) and p.min_length and len(p.parsed_string) < p.min_length
            for p in _leaves(self.inner)
        )

    def get_allowed_characters(self) -> str:
        chars = self.inner.get_allowed_characters()
        if self.in_string:
            chars = _drop(chars, "control")
            if not self.escaped and "\\" in chars and self._short_string():
                chars = chars.replace("\\", "")
            if not self.escaped and " " in chars and self._bounded_start():
                chars = chars.replace(" ", "")
            return chars
        if self.no_ws:
            chars = _drop(chars, "ws")
        if self.after_comma:
            chars = _drop(chars, "close")
        number_state = _types().NumberParsingState
        if any(isinstance(p, number_state) and not p.allow_floating_point for p in _leaves(self.inner)):
            chars = _drop(chars, "float")
        if self.inner.can_end() and not _drop(chars, "ws"):
            return ""  # the value is complete: nothing but EOS
        return chars

    def can_end(self) -> bool:
        return not self.in_string and self.inner.can_end()

    def shortcut_key(self) -> Any:
        if not self.in_string or self.escaped or self._short_string() or self._bounded_start():
            return None
        return self.inner.shortcut_key()

    def cache_key(self) -> Any:
        key = self.inner.cache_key()
        return None if key is None else ("guard", key, self.in_string, self.escaped, self.no_ws, self.after_comma)


def pattern_leaf(guard: Any) -> Any:
    """The string-with-a-pattern being written, when that is all the parser is doing (else None)."""
    if not isinstance(guard, JsonGuard) or not guard.in_string or guard.escaped:
        return None
    leaves = _leaves(guard.inner)
    if len(leaves) != 1:
        return None
    leaf = leaves[0]
    if (isinstance(leaf, _types().StringParsingState) and leaf.regex_parser is not None and not leaf.allowed_strings
            and leaf.seen_opening_quote and not leaf.seen_closing_quote):
        return leaf
    return None
