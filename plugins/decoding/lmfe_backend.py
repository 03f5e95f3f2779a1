"""The ``lm-format-enforcer`` structured-output backend (JSON schema, regex, choice).

lm-format-enforcer works on characters: its parsers (``JsonSchemaParser``,
``RegexParser``, ``StringParser``/``UnionParser``) say which characters may
come next, and ``TokenEnforcer`` walks a prefix tree of the vocabulary with
them. Its own transformers integration does not import under transformers 5,
so the tokenizer data is built here from the exact token bytes of
:class:`~patchbay.decoding.TokenizerInfo`: every token whose bytes are valid
UTF-8 on their own is a "new word" token whose text is those bytes decoded.
Tokens that are only part of a UTF-8 character (byte-level BPE pieces of
rare characters) are never allowed — this backend cannot emit a character the
vocabulary has no whole token for (documented limit).

Defects of the library fixed here (each has a test):

- EOS inside an unterminated JSON string, or on the library's internal-error
  path: EOS is allowed only when our own JSON lexer is outside any string and
  the parser can end, and an internal error is a dead end (an empty row, which
  the engine reports) instead of "allow EOS";
- raw control characters inside JSON strings: they are removed from the
  alphabet of JSON constraints, from the free-text token cache, and from the
  allowed characters while inside a string;
- integers: ``"-0.5"``, ``"1e-5"`` were allowed for ``"type": "integer"``;
  ``.``/``e``/``E`` are masked while an integer is being written;
- whitespace at the start of a string is not counted (nor shown to the
  ``pattern``): ``" hello"`` passed ``maxLength: 5``; a string with
  ``maxLength`` or a pattern cannot start with a space here;
- ``minLength`` counted an escape sequence (``\\n``) as two characters; no
  escape may start before the minimum length is reached;
- a trailing comma before ``}`` (``{"a": 1,}``) when the object could end:
  no ``}`` or ``]`` right after a comma;
- endless trailing whitespace after the JSON value: the constraint terminates
  when the value is complete;
- a process-wide regex cache shared by every schema (unbounded, and built for
  the first tokenizer's alphabet): each compiled schema gets its own.

``disable_any_whitespace`` is honoured (no whitespace outside strings);
``whitespace_pattern`` is not (a 400 naming it); grammars are not supported.
"""

from __future__ import annotations

import logging
from functools import cache, lru_cache
from typing import Any

import numpy as np

from patchbay import hookimpl
from patchbay.decoding import ConstraintError, ConstraintSpec, TokenizerInfo

from ._masks import PerTokenizer, VocabMasks, pack_ids, row_view
from ._spec import COMMON_KEYWORDS, choice_values, formats_to_patterns, iter_schemas, load_schema, refuse, regex_value

NAME = "lm-format-enforcer"
log = logging.getLogger(__name__)

_WS = " \t\n\r"
_CONTROL = {c: None for c in range(0x20)}
_NO_WS = {ord(c): None for c in _WS}
_NO_FLOAT = {ord(c): None for c in ".eE"}
_NO_CLOSE = {ord(c): None for c in "}]"}
#: what lm-format-enforcer never writes inside a JSON string (quotes and backslashes of a pattern, control chars)
_JSON_FORBIDDEN = '"\\' + "".join(map(chr, range(0x20)))
_FORBIDDEN_SET = frozenset(_JSON_FORBIDDEN)
_TABLES = {"control": _CONTROL, "ws": _NO_WS, "float": _NO_FLOAT, "close": _NO_CLOSE}


@lru_cache(maxsize=512)
def _drop(chars: str, table_name: str) -> str:
    """``chars`` without the characters of one of the tables (memoized: the alphabets are long strings)."""
    return chars.translate(_TABLES[table_name])


def _safe_text(s: Any) -> bool:
    """A string lm-format-enforcer may emit verbatim inside JSON quotes."""
    return isinstance(s, str) and not any(c in '"\\' or ord(c) < 0x20 for c in s)


def _pattern_problem(sub: dict) -> str | None:
    """Why lm-format-enforcer could get stuck on the pattern whatever the tokenizer (None: it cannot)."""
    try:
        why = fsm_problem(sub["pattern"], None, None, _JSON_FORBIDDEN)
    except Exception as e:  # noqa: BLE001 - interegular raises several types
        return f"its regex engine cannot parse the pattern ({type(e).__name__}: {e})"
    return why.replace("(or, in JSON, quotes", "(here: quotes") if why else None


def _plain_enum(values: list) -> bool:
    return all(_safe_text(v) for v in values) or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _local_def(ref: Any) -> bool:
    ref = str(ref)
    return (ref.startswith("#/$defs/") or ref.startswith("#/definitions/")) and ref.count("/") == 2


#: JSON-schema keywords lm-format-enforcer enforces (annotations aside), and what it refuses
JSON_KEYWORDS = COMMON_KEYWORDS.extended(
    checks={
        "pattern": [_pattern_problem],
        "const": [refuse("only string constants without quotes, backslashes or control characters",
                         lambda sub: not _safe_text(sub["const"]))],
        "enum": [refuse("only enums of plain strings (no quotes, backslashes, control characters) or of numbers",
                        lambda sub: not _plain_enum(sub["enum"]))],
        "properties": [refuse("property names with quotes, backslashes or control characters",
                              lambda sub: not all(_safe_text(k) for k in sub["properties"]))],
        "items": [refuse("items must be one schema (tuples are not supported)", lambda sub: not isinstance(sub["items"], dict))],
        "$ref": [refuse("only references to #/$defs/<name> or #/definitions/<name>", lambda sub: not _local_def(sub["$ref"]))],
    },
)


def _strip_anchors(pattern: str) -> str:
    p = pattern[1:] if pattern.startswith("^") else pattern
    return p[:-1] if p.endswith("$") and not p.endswith("\\$") else p


def fsm_problem(
    pattern: str, singles: frozenset[str] | None, chars: frozenset[str] | None, forbidden: str
) -> str | None:
    """Why lm-format-enforcer could get stuck on ``pattern`` with this tokenizer (None: it cannot).

    lm-format-enforcer writes a regex character by character and never looks
    ahead: if a state it can reach (through any character the vocabulary holds,
    ``forbidden`` aside) can only be left through characters no single token
    writes, the sequence dead-ends. So every reachable state must reach an
    accepting one through ``singles`` (minus ``forbidden``). ``None`` pools
    stand for every character.
    """
    import interegular
    from interegular.fsm import anything_else

    fsm = interegular.parse_pattern(_strip_anchors(pattern)).to_fsm()
    explicit = {sym for sym in fsm.alphabet if sym is not anything_else}

    def usable(pool: frozenset[str] | None) -> set:
        other = pool is None or any(c not in explicit and c not in forbidden for c in pool)
        out = set()
        for t, syms in fsm.alphabet.by_transition.items():
            if any(
                other if sym is anything_else else ((pool is None or sym in pool) and sym not in forbidden)
                for sym in syms
            ):
                out.add(t)
        return out

    reach_t, finish_t = usable(chars), usable(singles)
    seen, todo = {fsm.initial}, [fsm.initial]
    while todo:
        for t, nxt in fsm.map.get(todo.pop(), {}).items():
            if t in reach_t and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    back: dict[Any, list] = {}
    for state, trans in fsm.map.items():
        for t, nxt in trans.items():
            if t in finish_t:
                back.setdefault(nxt, []).append(state)
    done, todo = set(fsm.finals), list(fsm.finals)
    while todo:
        for prev in back.get(todo.pop(), []):
            if prev not in done:
                done.add(prev)
                todo.append(prev)
    if fsm.initial not in done:
        return f"no text this tokenizer can write (one whole-character token at a time) matches {pattern!r}"
    if seen - done:
        return (f"{pattern!r} can reach a point that only characters this tokenizer has no single token for "
                "(or, in JSON, quotes, backslashes and control characters) continue")
    return None


def _writable_problem(schema: Any, data: _TokenizerData) -> str | None:
    """Strings the schema makes lm-format-enforcer write that this tokenizer cannot write."""
    forbidden = _JSON_FORBIDDEN
    for path, sub in iter_schemas(schema):
        if not isinstance(sub, dict):
            continue
        texts = [v for v in sub.get("enum", []) if isinstance(v, str)] + list(sub.get("properties") or {})
        if isinstance(sub.get("const"), str):
            texts.append(sub["const"])
        for text in texts:
            missing = sorted(set(text) - data.singles)
            if missing:
                return (f"{NAME} cannot write {text!r} (at {path}) with this tokenizer: no token is just "
                        f"{''.join(missing)!r}")
        if isinstance(sub.get("pattern"), str):
            why = fsm_problem(sub["pattern"], data.singles, data.chars, forbidden)
            if why:
                return f"{NAME} cannot enforce the pattern at {path}: {why}"
    return None


# --------------------------------------------------------------------------- per tokenizer


class _TokenizerData:
    """lm-format-enforcer's tokenizer data (prefix tree, free-text cache) for one served tokenizer."""

    def __init__(self, info: TokenizerInfo) -> None:
        from lmformatenforcer import TokenEnforcerTokenizerData
        from lmformatenforcer.tokenizerprefixtree import JsonFreetextTokenCache

        self.masks = VocabMasks(info)  # (no reference to ``info``: the cache holding this is keyed weakly by it)
        self.vocab_size = info.vocab_size
        if not self.masks.eos_ids:
            raise ConstraintError(f"{NAME}: the served tokenizer has no EOS token id, so no constraint can finish")
        V = info.vocab_size  # noqa: N806
        token_bytes = info.token_bytes
        strs: dict[int, str] = {}
        for i in self.masks.regular_ids.tolist():
            b = token_bytes[i]
            try:
                strs[i] = b.decode("utf-8")
            except UnicodeDecodeError:
                continue  # part of a character: never allowed (see the module docstring)
        self.token_str = strs
        regular = [(i, s, True) for i, s in strs.items()]

        def decode(ids: list[int]) -> str:
            return b"".join(token_bytes[i] or b"" for i in ids).decode("utf-8", errors="replace").rstrip("\ufffd")

        self.data = TokenEnforcerTokenizerData(regular, decode, list(self.masks.eos_ids), False, V)
        # free text inside JSON strings: without tokens holding raw control characters
        freetext = JsonFreetextTokenCache(False, V)
        for i, s, _ in regular:
            if not any(ord(c) < 0x20 for c in s):
                freetext.add_token(s, i)
        freetext.freeze()
        self.data.tokenizer_tree.json_freetext_tokens = freetext
        self.alphabet = self.data.tokenizer_alphabet
        self.json_alphabet = self.alphabet.translate(_CONTROL)
        #: characters that are a whole token by themselves: always writable, whatever came before
        self.singles = frozenset(t for t in strs.values() if len(t) == 1)
        #: every character any token holds
        self.chars = frozenset(c for t in strs.values() for c in t)
        #: (id, text, index of the first quote) of the tokens holding a double quote
        self.quote_tokens = [(i, t, t.index('"')) for i, t in strs.items() if '"' in t]


# --------------------------------------------------------------------------- the JSON guard


@cache
def _lmfe_types() -> tuple:
    from lmformatenforcer.characterlevelparser import SequenceParser, UnionParser
    from lmformatenforcer.jsonschemaparser import JsonSchemaParser, NumberParsingState, StringParsingState

    return JsonSchemaParser, NumberParsingState, StringParsingState, UnionParser, SequenceParser


def _leaves(parser: Any) -> list:
    """The parsers currently receiving characters (tops of the JSON stacks, through unions)."""
    JsonSchemaParser, _n, _s, UnionParser, _q = _lmfe_types()  # noqa: N806
    if isinstance(parser, JsonSchemaParser):
        return _leaves(parser.object_stack[-1]) if parser.object_stack else []
    if isinstance(parser, UnionParser):
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
        _j, _n, StringParsingState, _u, _q = _lmfe_types()  # noqa: N806
        return any(
            isinstance(p, StringParsingState) and p.seen_opening_quote and not p.seen_closing_quote
            and not p.parsed_string and (p.max_length is not None or p.regex_parser is not None)
            for p in _leaves(self.inner)
        )

    def _short_string(self) -> bool:
        """Inside a string that has not reached its minLength yet."""
        _j, _n, StringParsingState, _u, _q = _lmfe_types()  # noqa: N806
        return any(
            isinstance(p, StringParsingState) and p.min_length and len(p.parsed_string) < p.min_length
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
        _j, NumberParsingState, _s, _u, _q = _lmfe_types()  # noqa: N806
        if any(isinstance(p, NumberParsingState) and not p.allow_floating_point for p in _leaves(self.inner)):
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


# --------------------------------------------------------------------------- compiled constraint and matcher


class LmfeConstraint:
    """One ``TokenEnforcer`` per constraint; its per-state cache is shared by every sequence."""

    def __init__(self, root: Any, config: Any, data: _TokenizerData) -> None:
        from lmformatenforcer import TokenEnforcer
        from lmformatenforcer.tokenlist import TokenList

        self.data = data
        self.root = root
        self._token_list = TokenList
        self.enforcer = TokenEnforcer(data.data, root)
        root.config = config  # TokenEnforcer installs the full alphabet; JSON needs the safe one
        #: (regex context, regex state, at string start) -> tokens that stay inside a pattern string
        self._inside: dict[tuple, np.ndarray] = {}
        self._regex_chars: dict[tuple, frozenset[str]] = {}

    def matcher(self) -> LmfeMatcher:
        return LmfeMatcher(self)

    def allowed(self, parser: Any) -> np.ndarray:
        """The finished packed row for ``parser``'s state (cached by the parser's cache key)."""
        enforcer = self.enforcer
        key = parser.cache_key()
        if key is not None:
            hit = enforcer.allowed_token_cache.get(key)
            if hit is not None:
                return hit
        tokens = self._token_list(False, self.data.vocab_size)
        try:
            leaf = _pattern_leaf(parser)
            if leaf is not None:
                tokens.allowed_tokens = self._pattern_string_tokens(parser, leaf)
            else:
                enforcer._collect_allowed_tokens(parser, enforcer.tokenizer_tree.root, tokens, parser.shortcut_key())
            complete = bool(parser.can_end())
        except Exception:  # noqa: BLE001 - the library's internal errors become a dead end, never "allow EOS"
            log.warning("%s: internal error while computing the allowed tokens; the sequence ends here", NAME,
                        exc_info=True)
            tokens.allowed_tokens, complete = [], False
        row = pack_ids(tokens.allowed_tokens, self.data.vocab_size)
        self.data.masks.finish_row(row, complete)
        if key is not None:
            enforcer.allowed_token_cache[key] = row
        return row


    # -- inside a string with a pattern: the library walks the whole vocabulary tree with full JSON parser
    #    copies for every character (~100 ms a step on a 4k vocabulary). Same answer, computed in two parts:
    #    tokens that stay inside the string need only the regex (cached per regex state); tokens holding the
    #    closing quote are few and get the full parser from the quote on.

    def _allowed_regex_chars(self, regex: Any) -> frozenset[str]:
        key = (regex.context, regex.current_state)
        hit = self._regex_chars.get(key)
        if hit is None:
            hit = self._regex_chars[key] = frozenset(regex.get_allowed_characters()) - _FORBIDDEN_SET
        return hit

    def _inside_tokens(self, regex: Any, at_start: bool) -> list[int]:
        key = (regex.context, regex.current_state, at_start)
        hit = self._inside.get(key)
        if hit is not None:
            return hit
        out: list[int] = []

        def walk(node: Any, r: Any, first: bool) -> None:
            chars = self._allowed_regex_chars(r)
            for c, child in node.children.items():
                if c not in chars or (first and at_start and c == " "):
                    continue
                nr = r.add_character(c)
                out.extend(child.tokens)
                walk(child, nr, False)

        walk(self.enforcer.tokenizer_tree.root, regex, True)
        self._inside[key] = out
        return out

    def _pattern_string_tokens(self, parser: Any, leaf: Any) -> list[int]:
        regex, at_start = leaf.regex_parser, not leaf.parsed_string
        ids = list(self._inside_tokens(regex, at_start))
        for tid, text, q in self.data.quote_tokens:
            r, ok = regex, True
            for k, c in enumerate(text[:q]):
                if c not in self._allowed_regex_chars(r) or (k == 0 and at_start and c == " "):
                    ok = False
                    break
                r = r.add_character(c)
            if not ok or not r.can_end():
                continue
            p = parser
            for c in text:
                if c not in p.get_allowed_characters():
                    ok = False
                    break
                p = p.add_character(c)
            if ok:
                ids.append(tid)
        return ids


def _pattern_leaf(guard: Any) -> Any:
    """The string-with-a-pattern being written, when that is all the parser is doing (else None)."""
    if not isinstance(guard, JsonGuard) or not guard.in_string or guard.escaped:
        return None
    leaves = _leaves(guard.inner)
    if len(leaves) != 1:
        return None
    _j, _n, StringParsingState, _u, _q = _lmfe_types()  # noqa: N806
    leaf = leaves[0]
    if (isinstance(leaf, StringParsingState) and leaf.regex_parser is not None and not leaf.allowed_strings
            and leaf.seen_opening_quote and not leaf.seen_closing_quote):
        return leaf
    return None


class LmfeMatcher:
    __slots__ = ("compiled", "parser", "_row")

    def __init__(self, compiled: LmfeConstraint) -> None:
        self.compiled = compiled
        self.parser = compiled.root
        self._row: np.ndarray | None = None

    def _current(self) -> np.ndarray:
        if self._row is None:
            self._row = self.compiled.allowed(self.parser)
        return self._row

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        row_view(bitmask, row)[:] = self._current()

    def advance(self, token_id: int) -> bool:
        cur = self._current()
        if not (0 <= token_id < self.compiled.data.vocab_size) or not (cur[token_id >> 5] >> (token_id & 31)) & 1:
            return False
        text = self.compiled.data.token_str.get(token_id)
        if text is None:  # EOS (allowed, so the output is complete)
            return True
        parser = self.parser
        try:
            for c in text:
                parser = parser.add_character(c)
        except Exception:  # noqa: BLE001
            log.warning("%s: the parser rejected an allowed token", NAME, exc_info=True)
            return False
        self.parser = parser
        self._row = None
        return True

    def is_terminated(self) -> bool:
        row = self._current()
        return bool(np.any(row & self.compiled.data.masks.eos)) and self.compiled.data.masks.only_eos(row)


# --------------------------------------------------------------------------- backend


class LmfeBackend:
    name = NAME

    def __init__(self) -> None:
        self._data = PerTokenizer(_TokenizerData)

    def unsupported(self, spec: ConstraintSpec) -> str | None:
        if spec.kind == "grammar":
            return f"{NAME} does not support grammar constraints (Lark / EBNF / GBNF); use the outlines backend"
        if spec.kind not in ("json", "json_object", "regex", "choice"):
            return f"{NAME} does not support constraint kind {spec.kind!r}"
        if spec.kind in ("json", "json_object") and spec.whitespace_pattern is not None and not spec.disable_any_whitespace:
            return f"{NAME} does not support whitespace_pattern (disable_any_whitespace is supported)"
        if spec.kind == "json":
            return JSON_KEYWORDS.problem(spec.value, NAME)
        return None

    def compile(self, spec: ConstraintSpec, tokenizer: TokenizerInfo) -> LmfeConstraint:
        from lmformatenforcer import CharacterLevelParserConfig

        why = self.unsupported(spec)
        if why:
            raise ConstraintError(why)
        data = self._data.get(tokenizer)
        if spec.kind in ("json", "json_object"):
            schema = load_schema(spec.value) if spec.kind == "json" else {"type": "object"}
            schema = formats_to_patterns(schema)
            why = _writable_problem(schema, data)
            if why:
                raise ConstraintError(why)
            config = CharacterLevelParserConfig(
                alphabet=data.json_alphabet, max_consecutive_whitespaces=12, force_json_field_order=False,
                max_json_array_length=20,
            )
            root = JsonGuard(self._json_parser(schema, config), no_ws=spec.disable_any_whitespace)
            return LmfeConstraint(root, config, data)
        config = CharacterLevelParserConfig(alphabet=data.alphabet)
        if spec.kind == "regex":
            from lmformatenforcer import RegexParser

            pattern = regex_value(spec.value)
            try:
                why = fsm_problem(pattern, data.singles, data.chars, "")
                root = RegexParser(_strip_anchors(pattern), config)
            except Exception as e:  # noqa: BLE001 - interegular raises several types
                raise ConstraintError(f"invalid regex for {NAME}: {type(e).__name__}: {e}") from None
            if why:
                raise ConstraintError(f"{NAME} cannot enforce this regex: {why}")
            return LmfeConstraint(root, config, data)
        # choice
        from lmformatenforcer import StringParser, UnionParser

        choices = choice_values(spec.value)
        missing = sorted({c for choice in choices for c in choice if c not in data.singles})
        if missing:
            raise ConstraintError(
                f"{NAME} cannot produce the characters {''.join(missing)!r} with this tokenizer (no token is just "
                "that character); use the outlines backend"
            )
        return LmfeConstraint(UnionParser([StringParser(c) for c in dict.fromkeys(choices)]), config, data)

    @staticmethod
    def _json_parser(schema: dict, config: Any) -> Any:
        from lmformatenforcer import JsonSchemaParser
        from lmformatenforcer.external.jsonschemaobject import JsonSchemaObject

        context = JsonSchemaParser._Context()
        try:
            context.model_class = JsonSchemaObject(**schema)
        except Exception as e:  # noqa: BLE001 - pydantic validation of the schema
            raise ConstraintError(f"{NAME}: cannot read the JSON schema: {e}") from None
        context.alphabet_without_quotes = config.alphabet.replace('"', "")
        context.regex_parser_cache = {}  # per schema, not the library's process-wide dict
        context.active_parser = None
        try:
            parser = JsonSchemaParser(context, config)
        except Exception as e:  # noqa: BLE001
            raise ConstraintError(f"{NAME}: cannot compile the JSON schema: {e}") from None
        context.active_parser = parser
        return parser


@hookimpl
def register_decoding_backends(register: Any) -> None:
    register(LmfeBackend())


__all__ = ["LmfeBackend", "JSON_KEYWORDS", "JsonGuard"]
