"""Compiled constraints of the outlines backend and their per-sequence matchers, which fill the bitmask and advance.

- :class:`IndexConstraint` (regex, choice, JSON schema): one ``outlines_core.Index``
  shared by every sequence, a :class:`GuideMatcher` (an ``outlines_core.Guide``) each;
- :class:`GrammarConstraint` (grammars, ``json_object``): a pristine
  ``llguidance.LLMatcher`` deep-copied into an :class:`LLGuidanceMatcher` each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from patchbay.decoding import ConstraintError

from .._masks import VocabMasks, require_eos, row_view
from .vocab import NAME, OutlinesTokenizerData


class IndexConstraint:
    """A compiled regex: one ``outlines_core.Index`` shared by every sequence."""

    def __init__(self, index: Any, data: OutlinesTokenizerData) -> None:
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


class GrammarConstraint:
    """A compiled llguidance grammar: a pristine ``LLMatcher`` deep-copied for every sequence."""

    def __init__(self, grammar: str, data: OutlinesTokenizerData) -> None:
        import llguidance

        self.data = data
        self.grammar = grammar
        self._proto = llguidance.LLMatcher(data.ll_tokenizer, grammar, log_level=0)
        if self._proto.is_error():
            raise ConstraintError(f"{NAME}: invalid grammar: {short_ll_error(self._proto.get_error())}")

    def matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.data.masks, self._proto.deep_copy())


def short_ll_error(msg: str) -> str:
    """llguidance errors carry a state dump after the message; keep the message."""
    return msg.split("\n<state>", 1)[0].strip()


class _Matcher:
    """What both matchers share: the library writes the row, then only text tokens stay, and EOS is
    allowed (and accepted) exactly when the output is complete."""

    def __init__(self, masks: VocabMasks) -> None:
        self.masks = masks
        self._eos = frozenset(masks.eos_ids)

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        r = row_view(bitmask, row)
        if self._write(r):
            self.masks.finish_row(r, self._complete())

    def advance(self, token_id: int) -> bool:
        if token_id in self._eos:
            return self._complete()
        if not self.masks.is_text(token_id):
            return False
        return self._consume(token_id)

    def _write(self, row: np.ndarray) -> bool:
        """Write the library's allowed tokens into ``row``; False for a dead end (the row left empty)."""
        raise NotImplementedError

    def _complete(self) -> bool:
        raise NotImplementedError

    def _consume(self, token_id: int) -> bool:
        raise NotImplementedError


class GuideMatcher(_Matcher):
    def __init__(self, compiled: IndexConstraint, guide: Any) -> None:
        super().__init__(compiled.data.masks)
        self.compiled = compiled
        self.guide = guide

    def _write(self, row: np.ndarray) -> bool:
        self.guide.write_mask_into(row.ctypes.data, row.size, 4)
        return True

    def _complete(self) -> bool:
        return bool(self.guide.is_finished())

    def _consume(self, token_id: int) -> bool:
        try:
            self.guide.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        return True

    def is_terminated(self) -> bool:
        return self.compiled.terminal(self.guide)


class LLGuidanceMatcher(_Matcher):
    def __init__(self, masks: VocabMasks, m: Any) -> None:
        super().__init__(masks)
        self.m = m

    def _write(self, row: np.ndarray) -> bool:
        self.m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if self.m.is_error():
            row[:] = 0  # a dead end: the engine reports it rather than sampling garbage
            return False
        return True

    def _complete(self) -> bool:
        return bool(self.m.is_accepting())

    def _consume(self, token_id: int) -> bool:
        return bool(self.m.consume_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self.m.is_stopped()) and not self.m.is_error()
