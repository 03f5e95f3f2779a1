"""Incremental detokenization and stop-string detection for one sequence."""

from __future__ import annotations

from typing import Any, Sequence

from patchbay.engine.params import SamplingParams

#: prompt tokens fed to a new decode stream as context (spacing and merges at the boundary)
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a sequence's new tokens into text deltas; finds stop strings.

    ``text`` is the output so far (stop string removed when one ended it).
    :meth:`emit` returns what may be sent now: while the sequence runs, the
    last ``len(longest stop) - 1`` characters are held back, so a stop
    string is never half-sent.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams,
                 special_ids: frozenset[int] = frozenset()):
        self.params = params
        # slow-tokenizer semantics of spaces_between_special_tokens: special tokens kept in the
        # text are separated from their neighbours by one space
        self._spaced = special_ids if (not params.skip_special_tokens and params.spaces_between_special_tokens) else None
        self._space_next = False
        self.text = ""
        self.sent = 0
        self.stop_hit: str | None = None
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer = tokenizer
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=context, skip_special_tokens=params.skip_special_tokens)
        else:  # a tokenizer without a Rust backend: decode a sliding window
            self._ids = context
            self._prefix_len = len(context)
            self._prefix_text = self._decode(context)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

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

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token's text; returns the stop string it completed, if any."""
        delta = self._step(token_id)
        if self._spaced is not None and delta:
            if token_id in self._spaced:
                delta = (" " if self.text else "") + delta
                self._space_next = True
            elif self._space_next:
                delta = " " + delta
                self._space_next = False
        if not delta:
            return None
        start = len(self.text)
        self.text += delta
        if self.params.stop and check_stop:
            # a stop string may start up to (len - 1) characters before the delta
            search_from = max(0, start - self._holdback)
            best: tuple[int, str] | None = None
            for stop in self.params.stop:
                pos = self.text.find(stop, search_from)
                if pos != -1 and (best is None or pos < best[0]):
                    best = (pos, stop)
            if best is not None:
                pos, stop = best
                end = pos + len(stop) if self.params.include_stop_str_in_output else pos
                self.text = self.text[:end]
                self.stop_hit = stop
                return stop
        return None

    def emit(self, finished: bool) -> str:
        """The text not yet sent that may be sent now."""
        limit = len(self.text) if finished else max(self.sent, len(self.text) - self._holdback)
        out = self.text[self.sent : limit]
        self.sent = limit
        return out
