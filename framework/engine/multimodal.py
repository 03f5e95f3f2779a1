"""Images in the engine: their embeddings placed at placeholder positions, an encoder-output cache, and the
image hashes in prefix-cache keys.

A sequence whose prompt carries images holds a :class:`~patchbay.model.MultimodalInputs` (``seq.mm``):
each image's run of placeholder tokens, its content hash and its processed pixels.

- :class:`ImagePlacer` (the ModelRunner's, for a :class:`~patchbay.model.MultimodalModel`): each step it
  finds the placeholder positions among the step's tokens — a prefill chunk may hold part of an image
  (chunked prefill cut through it) and a decode row may be the last prompt token — gets those images'
  embeddings from the :class:`EncoderCache` or encodes the missing ones in one ``embed_items`` call, and
  writes the rows into the step's input embeddings. A preempted sequence recomputed later, or another
  request with the same image, finds the embeddings cached.
- :class:`EncoderCache`: least recently used entries by image hash, bounded by the rows it holds
  (``--encoder-cache-tokens``); the encoder runner keeps finished image embeddings (dual encoders) in one.
- :func:`block_extra`: what a KV block's prefix-cache key adds for the images its tokens touch (their hash
  and where each starts relative to the block), so two prompts whose token ids match but whose images differ
  never share blocks (vLLM's rule).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable

import torch

from patchbay.model import MultimodalInputs, MultimodalItem

if TYPE_CHECKING:
    from patchbay.engine.scheduler import Batch


def block_extra(mm: MultimodalInputs, block_size: int) -> Callable[[int], Hashable | None]:
    """Block index -> the images its positions touch, as ``((hash, where the image starts relative to the
    block), ...)``, or None for a block of text only (whose key is then a text block's)."""

    def extra(index: int) -> Hashable | None:
        start = index * block_size
        touched = mm.overlapping(start, start + block_size)
        if not touched:
            return None
        return tuple((it.hash, it.offset - start) for it in touched)

    return extra


class EncoderCache:
    """Encoder outputs by image hash, least recently used first out, at most ``capacity`` rows in all."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.rows = 0
        #: lookups that found an entry / that did not (images encoded)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        out = self._entries.get(key)
        if out is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return out

    def put(self, key: str, value: torch.Tensor) -> None:
        rows = value.shape[0] if value.dim() > 1 else 1
        if rows > self.capacity or key in self._entries:
            return
        while self.rows + rows > self.capacity:
            _, old = self._entries.popitem(last=False)
            self.rows -= old.shape[0] if old.dim() > 1 else 1
        self._entries[key] = value
        self.rows += rows


class ImagePlacer:
    """Puts image embeddings at their placeholder rows of a ModelRunner step (see the module docstring)."""

    def __init__(self, model: Any, cache_rows: int):
        self.model = model
        self.cache = EncoderCache(cache_rows)

    @staticmethod
    def spans(batch: Batch) -> list[tuple[int, MultimodalItem, int, int]]:
        """``(first flat row, item, first, end)``: the step's rows that take rows ``first:end`` of an item's
        embeddings. Rows are the runner's: decodes first (one each), then each prefill chunk."""
        out = []
        for row, seq in enumerate(batch.decodes):
            if seq.mm is not None:
                p = seq.num_computed
                for item in seq.mm.overlapping(p, p + 1):
                    out.append((row, item, p - item.offset, p - item.offset + 1))
        row = len(batch.decodes)
        for seq, n in batch.prefills:
            if seq.mm is not None:
                a = seq.num_computed
                for item in seq.mm.overlapping(a, a + n):
                    lo, hi = max(a, item.offset), min(a + n, item.end)
                    out.append((row + lo - a, item, lo - item.offset, hi - item.offset))
            row += n
        return out

    def embeddings(self, items: list[MultimodalItem]) -> dict[str, torch.Tensor]:
        """Each item's embeddings by hash: cached ones, the rest encoded together (and cached)."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, MultimodalItem] = {}
        for item in items:
            if item.hash in found or item.hash in missing:
                continue
            cached = self.cache.get(item.hash)
            if cached is not None:
                found[item.hash] = cached
            else:
                missing[item.hash] = item
        if missing:
            outs = self.model.embed_items([it.data for it in missing.values()])
            for (key, item), emb in zip(missing.items(), outs):
                if emb.shape[0] != item.length:
                    raise ValueError(f"an image gave {emb.shape[0]} embeddings for {item.length} placeholders")
                found[key] = emb
                self.cache.put(key, emb)
        return found

    def place(self, x: torch.Tensor, spans: list[tuple[int, MultimodalItem, int, int]]) -> torch.Tensor:
        """Overwrite the placeholder rows of the step's input embeddings ``x`` ``[T, hidden]``."""
        by_hash = self.embeddings([item for _, item, _, _ in spans])
        for row, item, lo, hi in spans:
            x[row : row + hi - lo] = by_hash[item.hash][lo:hi].to(x.dtype)
        return x
