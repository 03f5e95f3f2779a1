"""Incremental detokenization of one sequence's output (stop strings are :mod:`~patchbay.engine.stopping`'s)."""

from __future__ import annotations

from typing import Any, Sequence

from patchbay.engine.params import SamplingParams
from patchbay.engine.stopping import holdback

#: prompt tokens fed to a new decode stream as context (spacing and merges at the boundary)
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a sequence's new tokens into text.

    ``text`` is the output so far. :meth:`emit` returns what may be sent now:
    while the sequence runs, the last characters that could start a stop
    string are held back.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams,
                 special_ids: frozenset[int] = frozenset()):
        self.skip_special_tokens = params.skip_special_tokens
        self._hidden = params.hidden_token_ids
        # slow-tokenizer semantics of spaces_between_special_tokens: special tokens kept in the
        # text are separated from their neighbours by one space
        self._spaced = special_ids if (not params.skip_special_tokens and params.spaces_between_special_tokens) else None
        self._space_next = False
        self.text = ""
        self.sent = 0
        self._holdback = holdback(params)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer = tokenizer
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=context, skip_special_tokens=params.skip_special_tokens)
        else:  # a tokenizer without a Rust backend: decode a sliding window
            self._ids = context
            self._prefix_text = self._decode(context)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, token_id: int) -> str:
        if self._backend is not None:
            return self._stream.step(self._backend, token_id) or ""
        self._ids.append(token_id)
        full = self._decode(self._ids)
        if full.endswith("\ufffd"):
            return ""
        delta = full[len(self._prefix_text) :]
        self._ids = self._ids[-_CONTEXT_TOKENS:]
        self._prefix_text = self._decode(self._ids)
        return delta

    def add(self, token_id: int) -> int:
        """Append one token's text; returns where the new text starts in :attr:`text`."""
        if token_id in self._hidden:
            return len(self.text)
        delta = self._step(token_id)
        if self._spaced is not None and delta:
            if token_id in self._spaced:
                delta = (" " if self.text else "") + delta
                self._space_next = True
            elif self._space_next:
                delta = " " + delta
                self._space_next = False
        start = len(self.text)
        self.text += delta
        return start

    def cut(self, end: int) -> None:
        """Drop the text from ``end`` on (a stop string ended the output there)."""
        self.text = self.text[:end]

    def emit(self, finished: bool) -> str:
        """The text not yet sent that may be sent now."""
        limit = len(self.text) if finished else max(self.sent, len(self.text) - self._holdback)
        out = self.text[self.sent : limit]
        self.sent = limit
        return out
