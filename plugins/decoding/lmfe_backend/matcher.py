"""A compiled lm-format-enforcer constraint and its per-sequence matcher, which fills the bitmask and advances.

Rows are computed once per parser state (the ``TokenEnforcer``'s cache is shared by every sequence) and
finished like every backend's: text tokens only, EOS exactly when the output is complete.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._masks import pack_ids, row_view
from .checks import JSON_FORBIDDEN
from .guard import pattern_leaf
from .vocab import NAME, LmfeTokenizerData

log = logging.getLogger(__package__)
_FORBIDDEN_SET = frozenset(JSON_FORBIDDEN)


class LmfeConstraint:
    """One ``TokenEnforcer`` per constraint; its per-state cache is shared by every sequence."""

    def __init__(self, root: Any, config: Any, data: LmfeTokenizerData) -> None:
        from lmformatenforcer import TokenEnforcer
        from lmformatenforcer.tokenlist import TokenList

        self.data = data
        self.root = root
        self._token_list = TokenList
        self.enforcer = TokenEnforcer(data.data, root)
        root.config = config  # TokenEnforcer installs the full alphabet; JSON needs the safe one
        #: (regex context, regex state, at string start) -> tokens that stay inside a pattern string
        self._inside: dict[tuple, list[int]] = {}
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
        tokens = self._token_list(False, self.data.masks.vocab_size)
        try:
            leaf = pattern_leaf(parser)
            if leaf is not None:
                tokens.allowed_tokens = self._pattern_string_tokens(parser, leaf)
            else:
                enforcer._collect_allowed_tokens(parser, enforcer.tokenizer_tree.root, tokens, parser.shortcut_key())
            complete = bool(parser.can_end())
        except Exception:  # noqa: BLE001 - the library's internal errors become a dead end, never "allow EOS"
            log.warning("%s: internal error while computing the allowed tokens; the sequence ends here", NAME,
                        exc_info=True)
            tokens.allowed_tokens, complete = [], False
        row = pack_ids(tokens.allowed_tokens, self.data.masks.vocab_size)
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
        if not (0 <= token_id < self.compiled.data.masks.vocab_size) or not (cur[token_id >> 5] >> (token_id & 31)) & 1:
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
