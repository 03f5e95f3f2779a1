"""lm-format-enforcer's data for one served tokenizer, built from the exact token bytes: the token texts, the
prefix tree and free-text cache, the alphabets, and which characters a single token writes."""

from __future__ import annotations

from patchbay.decoding import TokenizerInfo

from .._backend import TokenizerData
from .._masks import require_eos

#: the backend's name (in its messages)
NAME = "lm-format-enforcer"


class LmfeTokenizerData(TokenizerData):
    """lm-format-enforcer's tokenizer data (prefix tree, free-text cache) for one served tokenizer."""

    def __init__(self, info: TokenizerInfo) -> None:
        from lmformatenforcer import TokenEnforcerTokenizerData
        from lmformatenforcer.tokenizerprefixtree import JsonFreetextTokenCache

        super().__init__(info)
        require_eos(self.masks, NAME)
        V = info.vocab_size  # noqa: N806
        token_bytes = info.token_bytes
        strs: dict[int, str] = {}
        for i in self.masks.regular_ids.tolist():
            b = token_bytes[i]
            try:
                strs[i] = b.decode("utf-8")
            except UnicodeDecodeError:
                continue  # part of a character: never allowed (see the package docstring)
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
        #: the alphabet of JSON constraints: without raw control characters
        self.json_alphabet = "".join(c for c in self.alphabet if ord(c) >= 0x20)
        #: characters that are a whole token by themselves: always writable, whatever came before
        self.singles = frozenset(t for t in strs.values() if len(t) == 1)
        #: every character any token holds
        self.chars = frozenset(c for t in strs.values() for c in t)
        #: (id, text, index of the first quote) of the tokens holding a double quote
        self.quote_tokens = [(i, t, t.index('"')) for i, t in strs.items() if '"' in t]
