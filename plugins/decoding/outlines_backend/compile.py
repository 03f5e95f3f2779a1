"""What the outlines backend honours, and compiling a spec: JSON-schema keyword checks, the schema's regex,
regexes and choices into an ``outlines_core.Index``, grammars and ``json_object`` into an llguidance grammar."""

from __future__ import annotations

import re
from typing import Any

from patchbay.decoding import KINDS, ConstraintError, ConstraintSpec
from patchbay.isolation import Shared, isolated

from .._backend import TokenizerBackend
from .._spec import (
    COMMON_KEYWORDS,
    choice_values,
    formats_to_patterns,
    json_text,
    load_schema,
    not_with,
    refuse,
    regex_value,
)
from .matchers import GrammarConstraint, IndexConstraint, short_ll_error
from .patterns import PatternError, choice_regex, json_safe_patterns
from .vocab import NAME, OutlinesTokenizerData


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
                                        lambda sub: "properties" in sub
                                        and not isinstance(sub["additionalProperties"], bool))],
        "prefixItems": [not_with("prefixItems", "minItems", "maxItems")],
        "$ref": [refuse("a remote $ref", lambda sub: not str(sub["$ref"]).startswith("#"))],
        "items": [refuse("boolean items", lambda sub: isinstance(sub["items"], bool))],
        "type": [refuse("a type list containing object",
                        lambda sub: isinstance(sub["type"], list) and "object" in sub["type"]
                        and len(sub["type"]) > 1)],
    },
)


class OutlinesBackend(TokenizerBackend):
    name = NAME
    #: ``auto`` tries outlines first: it honours every constraint kind, lm-format-enforcer (20) no grammars
    auto_priority = 10
    kinds = frozenset(KINDS)
    json_keywords = JSON_KEYWORDS
    tokenizer_data = OutlinesTokenizerData

    def _compile(self, spec: ConstraintSpec, data: OutlinesTokenizerData) -> IndexConstraint | GrammarConstraint:
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
            schema = json_safe_patterns(formats_to_patterns(schema))
        except PatternError as e:
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

    def _index(self, regex: str, data: OutlinesTokenizerData, what: str) -> IndexConstraint:
        try:  # the automaton is built in the compile's worker process (time and memory bounded)
            index = isolated(build_index, regex, Shared(("vocabulary", data.key), data.vocabulary))
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

    def _grammar(self, text: Any, data: OutlinesTokenizerData) -> GrammarConstraint:
        import llguidance

        if not isinstance(text, str) or not text.strip():
            raise ConstraintError("grammar: expected the grammar text (Lark or EBNF / GBNF)")
        try:
            grammar = llguidance.grammar_from(grammar_dialect(text), text)
        except ValueError as e:
            raise ConstraintError(f"invalid grammar: {e}") from None
        err = llguidance.LLMatcher.validate_grammar(grammar, data.ll_tokenizer)
        if err:
            raise ConstraintError(f"invalid grammar: {short_ll_error(err)}")
        return GrammarConstraint(grammar, data)


def build_index(regex: str, vocabulary: Any) -> Any:
    """outlines_core's ``Index`` of ``regex`` over ``vocabulary`` (runs in a compile worker process)."""
    from outlines_core import Index

    return Index(regex, vocabulary)


#: a GBNF rule definition: ``name ::= ...`` at the start of a line (Lark writes ``name: ...``)
_GBNF_RULE = re.compile(r"^[ \t]*[A-Za-z_][A-Za-z0-9_-]*[ \t]*::=", re.MULTILINE)


def grammar_dialect(text: str) -> str:
    """``"gbnf"`` when any line defines a rule with ``::=`` (llama.cpp's GBNF), else ``"lark"``: Lark text
    is parsed as Lark, whatever its rules look like (``?start:`` and ``?expr:`` included)."""
    return "gbnf" if _GBNF_RULE.search(text) else "lark"


def _ll_json_options(spec: ConstraintSpec) -> dict[str, Any]:
    if spec.disable_any_whitespace:
        return {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    if spec.whitespace_pattern is not None:
        return {"whitespace_flexible": True, "whitespace_pattern": spec.whitespace_pattern}
    return {}


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg
