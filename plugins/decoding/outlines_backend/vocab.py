"""What the outlines backend builds once per served tokenizer, from the exact token bytes: the outlines_core
``Vocabulary`` and the llguidance ``LLTokenizer`` (each on first use)."""

from __future__ import annotations

from typing import Any

from patchbay.decoding import TokenizerInfo

from .._backend import TokenizerData
from .._masks import VocabMasks, require_eos

#: the backend's name (in its messages)
NAME = "outlines"


class OutlinesTokenizerData(TokenizerData):
    """Everything built once per served tokenizer (lazily: a grammar never needs the Vocabulary)."""

    def __init__(self, info: TokenizerInfo) -> None:
        super().__init__(info)
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

            self._ll_tokenizer = llguidance.LLTokenizer(LLTokenizerSource(self.masks))
        return self._ll_tokenizer


class LLTokenizerSource:
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
