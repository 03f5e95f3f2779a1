"""The paged KV cache's block pool: allocation, per-sequence block tables, prefix caching.

Blocks are fixed-size (``block_size`` tokens) pages of every layer's K/V
cache. A sequence owns a *block table*: the ids of its blocks in order.

Prefix caching: once a block is full, it is registered under a key made of
its parent's key, its tokens and the request's cache salt (a hash chain) —
plus, for a block whose tokens are image placeholders, what ``extra`` says
of those images (their content hash: :func:`patchbay.engine.multimodal.block_extra`) —, so
a later sequence with the same prefix can reuse it instead of recomputing
it. A block whose reference count drops to zero goes back to the free queue
but keeps its cached contents until it is handed out again (least recently
freed first). Free blocks are therefore either empty or cached-and-evictable,
and ``num_free`` counts both.

Which free block is handed out next. With ``lazy`` memory (the CPU cache is an
anonymous mapping: a page costs RAM only once written) the pool stays as small
as the load needs: a block already written is reused before a fresh one is
touched — first an empty one, then (least recently freed first) a cached block
no request has reused yet (a one-off prompt's or answer's), and only then a
fresh block; cached blocks that were reused (shared prefixes, a conversation's
earlier turns once it came back) are evicted last. So one-off traffic keeps
the resident cache at its working set, not at ``--kv-cache-memory``. Without
``lazy`` (memory committed up front, as on CUDA) fresh blocks go first and
eviction is plain least-recently-freed, as vLLM's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Sequence

#: block index -> what the block's key adds to its tokens (None: nothing)
Extra = Callable[[int], Hashable | None] | None


def _key(parent: Hashable | None, tokens: Sequence[int], salt: str | None, extra: Hashable | None) -> Hashable:
    key = (hash(parent), tuple(tokens), salt)
    return key if extra is None else (*key, extra)


class Block:
    __slots__ = ("id", "ref_cnt", "key", "reused")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_cnt = 0
        self.key: Hashable | None = None
        #: a request took it from the prefix cache since it was registered
        self.reused = False


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, lazy: bool = False):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        #: free blocks never written (handed out in id order)
        self._fresh: OrderedDict[int, Block] = OrderedDict((b.id, b) for b in self.blocks)
        #: free blocks written before, holding nothing cached
        self._empty: OrderedDict[int, Block] = OrderedDict()
        #: free cached blocks no request reused yet / reused ones, least recently freed first
        self._cold: OrderedDict[int, Block] = OrderedDict()
        self._hot: OrderedDict[int, Block] = OrderedDict()
        #: the order free blocks are handed out in
        self._order = ((self._empty, self._cold, self._fresh, self._hot) if lazy
                       else (self._fresh, self._empty, self._cold, self._hot))
        #: prefix key -> block holding those tokens
        self._cached: dict[Hashable, Block] = {}
        self.hits = 0
        self.queries = 0
        #: prompt tokens looked up in the prefix cache, and those found there (vLLM counts these)
        self.query_tokens = 0
        self.hit_tokens = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_free(self) -> int:
        return len(self._fresh) + len(self._empty) + len(self._cold) + len(self._hot)

    @property
    def num_touched(self) -> int:
        """Blocks ever handed out (with ``lazy`` memory: the cache's resident part)."""
        return self.num_blocks - len(self._fresh)

    def is_free(self, block: Block) -> bool:
        return any(block.id in pool for pool in self._order)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    # ------------------------------------------------------------------ prefix cache

    def block_keys(self, token_ids: Sequence[int], salt: str | None, num_full_blocks: int, start: int = 0,
                   parent: Hashable | None = None, extra: Extra = None) -> list[Hashable]:
        """Chain keys of full blocks ``start .. num_full_blocks-1`` of ``token_ids``."""
        keys = []
        bs = self.block_size
        for i in range(start, num_full_blocks):
            parent = _key(parent, token_ids[i * bs : (i + 1) * bs], salt, extra(i) if extra else None)
            keys.append(parent)
        return keys

    def match_prefix(self, token_ids: Sequence[int], salt: str | None, extra: Extra = None) -> list[Block]:
        """The longest run of cached full blocks that starts ``token_ids`` (not yet owned)."""
        if not self.enable_prefix_caching:
            return []
        self.queries += 1
        found: list[Block] = []
        bs = self.block_size
        parent: Hashable | None = None
        for i in range(len(token_ids) // bs):
            key = _key(parent, token_ids[i * bs : (i + 1) * bs], salt, extra(i) if extra else None)
            block = self._cached.get(key)
            if block is None:
                break
            found.append(block)
            parent = key
        if found:
            self.hits += 1
        self.query_tokens += len(token_ids)
        self.hit_tokens += len(found) * bs
        return found

    # ------------------------------------------------------------------ ownership

    def take(self, blocks: list[Block]) -> None:
        """Start owning blocks found by :meth:`match_prefix`."""
        for block in blocks:
            if block.ref_cnt == 0:
                (self._hot if block.reused else self._cold).pop(block.id)
            block.reused = True
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[Block] | None:
        """``n`` fresh blocks, or ``None`` (and nothing taken) when fewer are free."""
        if n > self.num_free:
            return None
        out = []
        for pool in self._order:
            while pool and len(out) < n:
                _, block = pool.popitem(last=False)
                if block.key is not None:
                    if self._cached.get(block.key) is block:
                        del self._cached[block.key]
                    block.key = None
                block.reused = False
                block.ref_cnt = 1
                out.append(block)
        return out

    def register(self, block: Block, key: Hashable) -> None:
        """Record that ``block`` (full) holds the tokens ``key`` names."""
        if not self.enable_prefix_caching or block.key is not None:
            return
        block.key = key
        self._cached.setdefault(key, block)

    def release(self, blocks: list[Block]) -> None:
        """Drop one reference to each block; unreferenced blocks become free.

        Released in reverse, so a sequence's tail blocks are evicted before
        its prefix (which other requests are more likely to share).
        """
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise AssertionError(f"block {block.id} released more often than taken")
            if block.ref_cnt == 0:
                pool = self._empty if block.key is None else self._hot if block.reused else self._cold
                pool[block.id] = block
