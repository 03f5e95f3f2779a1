"""Token masks shared by the structured-output backends (numpy only at module level).

- :func:`pack_ids`: token ids -> one packed int32 row; :func:`row_view`: one row
  of the engine's bitmask as a writable numpy view;
- :class:`VocabMasks`: per-tokenizer packed masks (regular tokens, EOS) and the
  one step every matcher ends ``fill_bitmask`` with (:meth:`VocabMasks.finish_row`):
  never a special or unknown id, EOS exactly when the output is complete;
- :class:`PerTokenizer`: a small per-backend cache of tokenizer-derived
  structures, keyed weakly by the :class:`~patchbay.decoding.TokenizerInfo`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Iterable

import numpy as np

from patchbay.decoding import ConstraintError, TokenizerInfo


def words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def pack_ids(ids: Iterable[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids -> int32 ``[ceil(V / 32)]`` with bit ``j`` of word ``w`` set for token ``32 * w + j``."""
    n = words(vocab_size)
    flags = np.zeros(n * 32, dtype=np.bool_)
    arr = ids if isinstance(ids, np.ndarray) else np.fromiter(ids, dtype=np.int64)
    if arr.size:
        flags[arr] = True
    return np.packbits(flags, bitorder="little").view("<i4").astype(np.int32, copy=False)


def row_view(bitmask: Any, row: int) -> np.ndarray:
    """``bitmask[row]`` of a CPU int32 torch tensor (or numpy array) as a writable numpy view."""
    r = bitmask[row]
    if hasattr(r, "numpy"):
        if r.device.type != "cpu":
            raise ValueError("fill_bitmask needs a CPU bitmask")
        r = r.numpy()
    if r.dtype != np.int32 or not r.flags["C_CONTIGUOUS"]:
        raise ValueError("fill_bitmask needs a contiguous int32 bitmask")
    return r


class VocabMasks:
    """Masks derived once from a :class:`TokenizerInfo`."""

    def __init__(self, info: TokenizerInfo) -> None:
        # no reference to ``info`` itself: per-tokenizer caches are keyed weakly by it
        self.token_bytes = info.token_bytes
        self.vocab_size = info.vocab_size
        self.eos_ids = tuple(i for i in info.eos_token_ids if 0 <= i < info.vocab_size)
        eos = set(self.eos_ids)
        regular = [i for i, b in enumerate(info.token_bytes) if b and i not in eos]
        #: tokens that produce text (not special, not unknown, not empty)
        self.regular = pack_ids(regular, info.vocab_size)
        self.eos = pack_ids(self.eos_ids, info.vocab_size)
        self.not_eos = ~self.eos
        self.regular_ids = np.asarray(regular, dtype=np.int64)

    def is_text(self, token_id: int) -> bool:
        """A token that produces text (what a matcher may consume; EOS and specials are not)."""
        return 0 <= token_id < self.vocab_size and bool(self.token_bytes[token_id]) and token_id not in self.eos_ids

    def finish_row(self, row: np.ndarray, complete: bool) -> None:
        """Keep only text tokens in ``row``; then allow EOS exactly when ``complete``."""
        np.bitwise_and(row, self.regular, out=row)
        if complete:
            np.bitwise_or(row, self.eos, out=row)

    def only_eos(self, row: np.ndarray) -> bool:
        return not np.any(row & self.not_eos)


class PerTokenizer:
    """``get(info)`` builds ``factory(info)`` once per live :class:`TokenizerInfo` (weakly keyed, thread-safe)."""

    def __init__(self, factory: Callable[[TokenizerInfo], Any]) -> None:
        self._factory = factory
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, info: TokenizerInfo) -> Any:
        with self._lock:
            hit = self._cache.get(info)
            if hit is None:
                hit = self._cache[info] = self._factory(info)
            return hit


def require_eos(masks: VocabMasks, backend: str) -> int:
    if masks.eos_ids:
        return masks.eos_ids[0]
    raise ConstraintError(f"{backend}: the served tokenizer has no EOS token id, so no constraint can finish")
