"""The ``outlines`` structured-output backend.

- regex, JSON schema and choice: ``outlines_core`` — a ``Vocabulary`` built from
  the exact token bytes, one ``Index`` (token-level DFA) per constraint, one
  ``Guide`` per sequence. JSON schemas become a regex through
  ``outlines_core.json_schema.build_regex_from_schema``;
- grammars (Lark, EBNF / GBNF) and free JSON (``json_object``): ``llguidance``,
  the engine outlines itself uses for grammars — an ``LLTokenizer`` built from
  the same bytes, one ``LLMatcher`` per sequence.

``outlines_core`` turns a schema into a regex and silently drops what a regex
cannot say (numeric bounds, ``uniqueItems``, ``minProperties``, ...). Such a
keyword is refused here by name (a 400), never ignored: every output that
finishes satisfies its schema. The keywords enforced are listed in
:data:`JSON_KEYWORDS`. Two things are rewritten before outlines_core sees the
schema: each ``pattern`` becomes a regex over the JSON text of the string (see
:func:`json_safe_pattern`), and each supported ``format`` becomes our own
sound pattern (outlines_core's date regex allows years beyond 9999 and
Unicode digits).

The heavy libraries are imported on first use, not when the plugin loads.
"""

from __future__ import annotations

import re
from typing import Any

from patchbay import hookimpl
from patchbay.decoding import ConstraintError, ConstraintSpec, TokenizerInfo

from ._masks import PerTokenizer, VocabMasks, require_eos, row_view
from ._spec import (
    COMMON_KEYWORDS,
    choice_values,
    formats_to_patterns,
    json_text,
    load_schema,
    not_with,
    refuse,
    regex_value,
    rewrite_schema,
)

NAME = "outlines"

_RUST_META = frozenset("\\.+*?()|[]{}^$#&-~")
_SAFE_CLASS = r'[^"\\\x00-\x1F]'


# --------------------------------------------------------------------------- helpers


def _rust_escape(text: str) -> str:
    return "".join("\\" + c if c in _RUST_META else c for c in text)


def choice_regex(choices: list[str]) -> str:
    return "(?:" + "|".join(_rust_escape(c) for c in choices) + ")"


class _PatternError(ValueError):
    pass


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
        raise _PatternError(f"invalid pattern {pattern!r}: {e}") from None
    if tree.state.flags & ~(re.UNICODE | re.ASCII):
        raise _PatternError(f"pattern {pattern!r}: inline flags are not supported")

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
                raise _PatternError(f"pattern {pattern!r}: unsupported class item {op}")
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
                    raise _PatternError(f"pattern {pattern!r}: inline flags are not supported")
                out.append("(?:" + seq(list(sub)) + ")")
            elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
                lo, hi, sub = av
                hi_s = "" if hi is C.MAXREPEAT else str(hi)
                out.append("(?:" + seq(list(sub)) + f"){{{lo},{hi_s}}}")
            elif op is C.AT:
                start = top and k == 0 and av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING)
                end = top and k == n - 1 and av in (C.AT_END, C.AT_END_STRING)
                if not (start or end):
                    raise _PatternError(f"pattern {pattern!r}: anchors and word boundaries are only supported at its ends")
            else:
                raise _PatternError(f"pattern {pattern!r}: {str(op).lower()} is not supported (lookaround, "
                                    "backreferences and possessive or atomic groups are not)")
        return "".join(out)

    return seq(list(tree), top=True)


def _oneof_disjoint(options: list) -> bool:
    """True when at most one option can match any value (distinct single primitive types)."""
    types = []
    for o in options:
        if not isinstance(o, dict) or not isinstance(o.get("type"), str):
            return False
        types.append(o["type"])
    if "number" in types and "integer" in types:
        return False
    return len(set(types)) == len(types)


#: JSON-schema keywords outlines_core turns into the regex faithfully (annotations aside), and what it refuses
JSON_KEYWORDS = COMMON_KEYWORDS.extended(
    {"prefixItems", "oneOf"},
    {
        "oneOf": [refuse("oneOf whose options may overlap (only options of distinct primitive types are exclusive by "
                         "construction)", lambda sub: not _oneof_disjoint(sub["oneOf"]))],
        "additionalProperties": [refuse("an additionalProperties schema next to properties",
                                        lambda sub: not isinstance(sub["additionalProperties"], bool) and "properties" in sub)],
        "prefixItems": [not_with("prefixItems", "minItems", "maxItems")],
        "$ref": [refuse("a remote $ref", lambda sub: not str(sub["$ref"]).startswith("#"))],
        "items": [refuse("boolean items", lambda sub: isinstance(sub["items"], bool))],
        "type": [refuse("a type list containing object",
                        lambda sub: isinstance(sub["type"], list) and "object" in sub["type"] and len(sub["type"]) > 1)],
    },
)


def _rewrite_patterns(schema: Any) -> Any:
    """A copy of ``schema`` with every string ``pattern`` made JSON-safe (see :func:`json_safe_pattern`)."""
    return rewrite_schema(schema, lambda k, v: (k, json_safe_pattern(v)) if k == "pattern" and isinstance(v, str) else None)


# --------------------------------------------------------------------------- per tokenizer


class _TokenizerData:
    """Everything built once per served tokenizer (lazily: a grammar never needs the Vocabulary)."""

    def __init__(self, info: TokenizerInfo) -> None:
        self.masks = VocabMasks(info)  # (no reference to ``info``: the cache holding this is keyed weakly by it)
        self._vocabulary: Any = None
        self._ll_tokenizer: Any = None

    @property
    def vocabulary(self) -> Any:
        if self._vocabulary is None:
            from outlines_core import Vocabulary

            eos = require_eos(self.masks, NAME)
            table: dict[bytes, list[int]] = {}
            for i in self.masks.regular_ids.tolist():
                table.setdefault(self.masks.token_bytes[i], []).append(i)
            self._vocabulary = Vocabulary(eos, table)
        return self._vocabulary

    @property
    def ll_tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(_LLTokenizerSource(self.masks))
        return self._ll_tokenizer


class _LLTokenizerSource:
    """What ``llguidance.LLTokenizer`` reads from a tokenizer wrapper, built from exact token bytes."""

    is_tokenizer_wrapper = True

    def __init__(self, masks: VocabMasks) -> None:
        self.eos_token_id = require_eos(masks, NAME)
        self.bos_token_id = None
        # every id the model can sample; ids without text are special tokens (never produced by text)
        text = set(masks.regular_ids.tolist())
        self.tokens = [b if i in text else f"<|patchbay-{i}|>".encode() for i, b in enumerate(masks.token_bytes)]
        self.special_token_ids = [i for i in range(len(self.tokens)) if i not in text]
        self._by_bytes: dict[bytes, int] = {}
        for i in sorted(text):
            self._by_bytes.setdefault(masks.token_bytes[i], i)
        self._max_len = max((len(b) for b in self._by_bytes), default=1)

    def __call__(self, text: str | bytes) -> list[int]:
        """Greedy longest-match tokenization (llguidance only uses it for forced tokens, which we do not use).

        Not the HF tokenizer: this runs on the engine thread, and a fast tokenizer
        shared with the HTTP side can fail with "Already borrowed".
        """
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        out: list[int] = []
        i = 0
        while i < len(data):
            for n in range(min(self._max_len, len(data) - i), 0, -1):
                t = self._by_bytes.get(data[i : i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                i += 1  # a byte no token has: skip it
        return out


# --------------------------------------------------------------------------- outlines_core


class IndexConstraint:
    """A compiled regex: one ``outlines_core.Index`` shared by every sequence."""

    def __init__(self, index: Any, data: _TokenizerData) -> None:
        self.index = index
        self.data = data
        self._vocab_eos = require_eos(data.masks, NAME)
        #: state -> nothing but EOS may follow
        self._terminal: dict[int, bool] = {}

    def matcher(self) -> GuideMatcher:
        from outlines_core import Guide

        return GuideMatcher(self, Guide(self.index))

    def terminal(self, guide: Any) -> bool:
        state = guide.get_state()
        hit = self._terminal.get(state)
        if hit is None:
            hit = self._terminal[state] = bool(guide.is_finished()) and all(
                t == self._vocab_eos for t in guide.get_tokens()
            )
        return hit


class GuideMatcher:
    def __init__(self, compiled: IndexConstraint, guide: Any) -> None:
        self.compiled = compiled
        self.guide = guide
        self._eos = frozenset(compiled.data.masks.eos_ids)

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        r = row_view(bitmask, row)
        self.guide.write_mask_into(r.ctypes.data, r.size, 4)
        self.compiled.data.masks.finish_row(r, bool(self.guide.is_finished()))

    def advance(self, token_id: int) -> bool:
        if token_id in self._eos:
            return bool(self.guide.is_finished())
        if not self.compiled.data.masks.is_text(token_id):
            return False
        try:
            self.guide.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        return True

    def is_terminated(self) -> bool:
        return self.compiled.terminal(self.guide)


# --------------------------------------------------------------------------- llguidance


class GrammarConstraint:
    """A compiled llguidance grammar: a pristine ``LLMatcher`` deep-copied for every sequence."""

    def __init__(self, grammar: str, data: _TokenizerData) -> None:
        import llguidance

        self.data = data
        self.grammar = grammar
        self._proto = llguidance.LLMatcher(data.ll_tokenizer, grammar, log_level=0)
        if self._proto.is_error():
            raise ConstraintError(f"{NAME}: invalid grammar: {_short_ll_error(self._proto.get_error())}")

    def matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self, self._proto.deep_copy())


class LLGuidanceMatcher:
    def __init__(self, compiled: GrammarConstraint, m: Any) -> None:
        self.compiled = compiled
        self.m = m
        self._eos = frozenset(compiled.data.masks.eos_ids)

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        r = row_view(bitmask, row)
        self.m.unsafe_compute_mask_ptr(r.ctypes.data, r.nbytes)
        if self.m.is_error():
            r[:] = 0  # a dead end: the engine reports it rather than sampling garbage
            return
        self.compiled.data.masks.finish_row(r, bool(self.m.is_accepting()))

    def advance(self, token_id: int) -> bool:
        if token_id in self._eos:
            return bool(self.m.is_accepting())
        if not self.compiled.data.masks.is_text(token_id):
            return False
        return bool(self.m.consume_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self.m.is_stopped()) and not self.m.is_error()


def _short_ll_error(msg: str) -> str:
    """llguidance errors carry a state dump after the message; keep the message."""
    return msg.split("\n<state>", 1)[0].strip()


# --------------------------------------------------------------------------- backend


class OutlinesBackend:
    name = NAME

    def __init__(self) -> None:
        self._data = PerTokenizer(_TokenizerData)

    # -- what can be honoured
    def unsupported(self, spec: ConstraintSpec) -> str | None:
        if spec.kind == "json":
            return JSON_KEYWORDS.problem(spec.value, NAME)
        if spec.kind in ("json_object", "regex", "choice", "grammar"):
            return None
        return f"{NAME} does not support constraint kind {spec.kind!r}"

    # -- compile
    def compile(self, spec: ConstraintSpec, tokenizer: TokenizerInfo) -> Any:
        why = self.unsupported(spec)
        if why:
            raise ConstraintError(why)
        data = self._data.get(tokenizer)
        if spec.kind == "regex":
            return self._index(regex_value(spec.value), data, what="regex")
        if spec.kind == "choice":
            return self._index(choice_regex(choice_values(spec.value)), data, what="choice")
        if spec.kind == "json":
            return self._index(self._schema_regex(spec), data, what="JSON schema")
        if spec.kind == "json_object":
            import llguidance

            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_ll_json_options(spec))
            return GrammarConstraint(grammar, data)
        if spec.kind == "grammar":
            return self._grammar(spec.value, data)
        raise ConstraintError(f"{NAME} does not support constraint kind {spec.kind!r}")

    def _schema_regex(self, spec: ConstraintSpec) -> str:
        from outlines_core.json_schema import build_regex_from_schema

        schema = load_schema(spec.value)
        try:
            schema = _rewrite_patterns(formats_to_patterns(schema))
        except _PatternError as e:
            raise ConstraintError(f"{NAME}: {e}") from None
        ws = "" if spec.disable_any_whitespace else spec.whitespace_pattern
        if ws:
            try:
                re.compile(ws)
            except re.error as e:
                raise ConstraintError(f"invalid whitespace_pattern {ws!r}: {e}") from None
        try:
            return build_regex_from_schema(json_text(schema), ws)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"{NAME}: cannot compile the JSON schema: {_first_line(str(e))}") from None

    def _index(self, regex: str, data: _TokenizerData, what: str) -> IndexConstraint:
        from outlines_core import Index

        try:
            index = Index(regex, data.vocabulary)
        except ValueError as e:
            detail = _first_line(str(e))
            try:
                re.compile(regex)
            except re.error as pe:  # Python's message says where the pattern is broken
                raise ConstraintError(f"invalid {what}: {pe} ({NAME}: {detail})") from None
            raise ConstraintError(
                f"{NAME} cannot compile this {what}: {detail} (lookaround and backreferences are not supported)"
            ) from None
        return IndexConstraint(index, data)

    def _grammar(self, text: Any, data: _TokenizerData) -> GrammarConstraint:
        import llguidance

        if not isinstance(text, str) or not text.strip():
            raise ConstraintError("grammar: expected the grammar text (Lark or EBNF / GBNF)")
        try:
            grammar = llguidance.grammar_from("grammar", text)
        except ValueError as e:
            raise ConstraintError(f"invalid grammar: {e}") from None
        err = llguidance.LLMatcher.validate_grammar(grammar, data.ll_tokenizer)
        if err:
            raise ConstraintError(f"invalid grammar: {_short_ll_error(err)}")
        return GrammarConstraint(grammar, data)


def _ll_json_options(spec: ConstraintSpec) -> dict[str, Any]:
    if spec.disable_any_whitespace:
        return {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    if spec.whitespace_pattern is not None:
        return {"whitespace_flexible": True, "whitespace_pattern": spec.whitespace_pattern}
    return {}


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg


@hookimpl
def register_decoding_backends(register: Any) -> None:
    register(OutlinesBackend())


__all__ = ["OutlinesBackend", "JSON_KEYWORDS", "json_safe_pattern", "choice_regex"]
