"""Continuous batching: which sequences run this step, and how many tokens each.

Every step has a budget of ``max_num_batched_tokens`` tokens and at most
``max_num_seqs`` running sequences. Running sequences are served first (one
token each when decoding, the next chunk of their prompt when prefilling);
then waiting ones are admitted while budget, sequence slots and KV blocks
last. Long prompts are prefilled in chunks across steps (chunked prefill).
While sequences are decoding, the prompt tokens of a step are capped at half
the budget: a step's length delays every decoding sequence's next token and
every prompt finishing in it, and prefill arithmetic runs about as fast in
1,024-row as in 2,048-row products (measured with 1024-token prompts at
concurrency 8: median TTFT 1.29 s against 1.76 s, ITL p99 0.63 against
1.15 s, the same output tokens/s). Steps without decodes (a burst of new
requests, pooling models) use the whole budget.
When a running sequence needs a block and none is free, the running sequence
that comes last in scheduling order is preempted: its blocks are released
and it goes back to the front of the queue, to be recomputed later.

Shared prefixes in flight: a waiting prompt whose prefix a running sequence
is computing right now (say eight requests with the same long system prompt
arriving together) is held back while that prefill runs, when it would reuse
at least half of its remaining prompt from it: admitted a step or a few
later, it finds those blocks in the prefix cache instead of computing the
same tokens beside it in the same steps (which would delay every prompt of
the step). Prompts behind it are admitted meanwhile; it keeps its place.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

import attrs

from patchbay.engine.blocks import BlockManager, Extra
from patchbay.engine.multimodal import block_extra
from patchbay.engine.sequence import Sequence, Status

#: waiting sequences held back per step at most: admission stops there (each costs a look at the prefills
#: in flight)
MAX_DEFERRED = 256


@attrs.define
class Batch:
    """One step's work. Decode sequences (one new token each) come first."""

    decodes: list[Sequence] = attrs.field(factory=list)
    #: (sequence, number of new tokens)
    prefills: list[tuple[Sequence, int]] = attrs.field(factory=list)
    preempted: list[Sequence] = attrs.field(factory=list)
    #: sequences that can never be scheduled (a whole-prompt pooling input over the token budget)
    rejected: list[Sequence] = attrs.field(factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)

    def items(self) -> Iterable[tuple[Sequence, int]]:
        for seq in self.decodes:
            yield seq, 1
        yield from self.prefills


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: str = "fcfs",
        needs_kv: bool = True,
        max_encoder_inputs: int = 16,
    ):
        self.blocks = blocks
        #: sequences with encoder inputs (audio windows) admitted per step at most: their encoder runs in that
        #: step, batched, and its memory grows with the batch
        self.max_encoder_inputs = max_encoder_inputs
        #: False for encoder-only models: no KV cache, no chunking (a prompt runs whole in one step)
        self.needs_kv = needs_kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ membership

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        if self.policy == "priority":
            # keep the queue ordered by (priority, arrival); a preempted sequence keeps its place
            key = (seq.priority, seq.arrival)
            for i, other in enumerate(self.waiting):
                if (other.priority, other.arrival) > key:
                    self.waiting.insert(i, seq)
                    return
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and release its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._free(seq)
        seq.status = Status.FINISHED

    def _free(self, seq: Sequence) -> None:
        if seq.blocks:
            self.blocks.release(seq.blocks)
            seq.blocks = []
        seq.num_computed = 0
        seq.last_key = None
        seq.num_registered_blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        if self.policy == "priority":
            self.add(seq)
        else:
            self.waiting.appendleft(seq)

    def _victim(self) -> Sequence:
        # running is in scheduling order: the last one is the least entitled, and not yet scheduled
        return self.running[-1]

    # ------------------------------------------------------------------ scheduling

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        if not self.needs_kv:
            return True
        need = self.blocks.blocks_needed(seq.num_computed + num_new) - len(seq.blocks)
        if need <= 0:
            return True
        got = self.blocks.allocate(need)
        if got is None:
            return False
        seq.blocks.extend(got)
        return True

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        if self.policy == "priority":
            self.running.sort(key=lambda s: (s.priority, s.arrival))
            self._make_room_for_urgent(batch)
        # prompt tokens this step may still take: half the budget beside decodes (see the module docstring)
        decoding = self.needs_kv and any(s.num_tokens - s.num_computed == 1 for s in self.running)
        prompt_left = max(1, budget // 2) if decoding else budget
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n > 1:
                n = min(n, prompt_left)
                if n < 1:  # no prompt tokens left this step: the prefill goes on next step
                    i += 1
                    continue
                prompt_left -= n
            scheduled = True
            while not self._grow(seq, n):
                victim = self._victim()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                continue  # seq left self.running; index i now holds the next one
            if n == 1:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, n))
            budget -= n
            i += 1

        if batch.preempted and self.policy != "priority":
            return batch
        encoding = 0
        deferred: list[Sequence] = []  # waiting for a shared prefix another sequence is computing
        # running sequences with full prompt blocks not in the prefix cache yet (few: prefills in flight)
        sharing = bool(self.waiting) and self.needs_kv and self.blocks.enable_prefix_caching
        prefilling = [s for s in self.running if self._computes_prompt_blocks(s)] if sharing else []
        while self.waiting and budget > 0 and prompt_left > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if prefilling and self._awaits_shared_prefix(seq, prefilling):
                deferred.append(self.waiting.popleft())
                if len(deferred) >= MAX_DEFERRED:
                    break  # looked deep enough for this step
                continue
            if seq.encoder_input is not None:
                if encoding >= self.max_encoder_inputs:
                    break
                encoding += 1
            hits = []
            if not self.needs_kv:
                if seq.num_tokens > budget:
                    if seq.num_tokens > self.max_num_batched_tokens:  # can never fit (endpoints refuse these)
                        self.waiting.popleft()
                        batch.rejected.append(seq)
                        continue
                    break
                self.waiting.popleft()
                seq.status = Status.RUNNING
                self.running.append(seq)
                batch.prefills.append((seq, seq.num_tokens))
                budget -= seq.num_tokens
                continue
            # prompt logprobs need every prompt position computed: no prefix cache for them
            if seq.num_computed == 0 and not seq.blocks and seq.params.prompt_logprobs is None:
                usable = (seq.num_tokens - 1) // self.blocks.block_size
                hits = self.blocks.match_prefix(seq.token_ids[: usable * self.blocks.block_size], seq.cache_salt,
                                                self._extra(seq))
            cached = len(hits) * self.blocks.block_size
            n = min(seq.num_tokens - cached, budget, prompt_left)
            need = self.blocks.blocks_needed(cached + n) - len(hits)
            free_hits = sum(1 for b in hits if b.ref_cnt == 0)
            if need + free_hits > self.blocks.num_free:
                break
            self.blocks.take(hits)
            seq.blocks = list(hits)
            seq.num_computed = cached
            seq.num_cached_tokens = max(seq.num_cached_tokens, cached)
            if hits:
                seq.last_key = hits[-1].key
                seq.num_registered_blocks = len(hits)
            if not self._grow(seq, n):  # cannot happen: checked above
                raise AssertionError("block accounting is off")
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            if n == 1:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, n))
            budget -= n
            prompt_left -= n
            if sharing and self._computes_prompt_blocks(seq):
                prefilling.append(seq)
        self.waiting.extendleft(reversed(deferred))
        return batch

    def _computes_prompt_blocks(self, seq: Sequence) -> bool:
        return seq.mm is None and seq.prompt_len // self.blocks.block_size > seq.num_registered_blocks

    def _awaits_shared_prefix(self, seq: Sequence, prefilling: list[Sequence]) -> bool:
        """Whether a running sequence of ``prefilling`` is still computing full prompt blocks that ``seq``
        (waiting, nothing computed) would reuse from the prefix cache once they are registered, and those
        make at least half of what ``seq`` has left to compute."""
        if seq.num_computed or seq.blocks or seq.mm is not None or seq.params.prompt_logprobs is not None:
            return False
        bs = self.blocks.block_size
        tokens = seq.token_ids
        usable = (len(tokens) - 1) // bs  # the last prompt token is always computed
        for other in prefilling:
            done = other.num_registered_blocks  # blocks of ``other`` already in the cache (seq hits those now)
            full = min(other.prompt_len // bs, usable)
            if full <= done or other.cache_salt != seq.cache_salt:
                continue
            if tokens[: (done + 1) * bs] != other.token_ids[: (done + 1) * bs]:
                continue
            shared = done + 1
            while shared < full and tokens[shared * bs : (shared + 1) * bs] == other.token_ids[shared * bs : (shared + 1) * bs]:
                shared += 1
            if 2 * (shared - done) * bs >= len(tokens) - done * bs:
                return True
        return False

    def _extra(self, seq: Sequence) -> Extra:
        """What the prefix-cache keys of ``seq``'s blocks add for its images (None: a text prompt)."""
        return None if seq.mm is None else block_extra(seq.mm, self.blocks.block_size)

    def _make_room_for_urgent(self, batch: Batch) -> None:
        """Priority policy: a waiting sequence preempts running ones of strictly lower priority
        (higher number) when it would not fit otherwise."""
        if not self.waiting or not self.running:
            return
        cand = self.waiting[0]
        need = self.blocks.blocks_needed(min(cand.num_tokens, self.max_num_batched_tokens))
        while self.running and self.running[-1].priority > cand.priority:
            if len(self.running) < self.max_num_seqs and need <= self.blocks.num_free:
                return
            victim = self.running[-1]
            self._preempt(victim)
            batch.preempted.append(victim)

    def after_step(self, batch: Batch) -> None:
        """Advance each scheduled sequence; register its newly full blocks in the prefix cache."""
        bs = self.blocks.block_size
        caching = self.blocks.enable_prefix_caching and self.needs_kv
        for seq, n in batch.items():
            seq.num_computed += n
            if not caching:
                continue
            full = seq.num_computed // bs
            if full > seq.num_registered_blocks:
                keys = self.blocks.block_keys(
                    seq.token_ids, seq.cache_salt, full, start=seq.num_registered_blocks, parent=seq.last_key,
                    extra=self._extra(seq),
                )
                for idx, key in zip(range(seq.num_registered_blocks, full), keys):
                    self.blocks.register(seq.blocks[idx], key)
                seq.last_key = keys[-1]
                seq.num_registered_blocks = full
