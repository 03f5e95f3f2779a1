"""Block pool and scheduler invariants, without a model: tokens are made up."""

from __future__ import annotations

import random

import pytest

from patchbay.engine.blocks import BlockManager
from patchbay.engine.params import SamplingParams
from patchbay.engine.scheduler import Scheduler
from patchbay.engine.sequence import Sequence, Status


def make_seq(rid: str, n_prompt: int, max_tokens: int = 8, *, start: int = 0, salt: str | None = None,
             priority: int = 0) -> Sequence:
    prompt = [(start + i) % 1000 for i in range(n_prompt)]
    return Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens), sink=None, priority=priority,
                    cache_salt=salt)


def owned_blocks(sched: Scheduler) -> int:
    return sum(len(s.blocks) for s in sched.running)


def check_invariants(sched: Scheduler) -> None:
    bm = sched.blocks
    refs: dict[int, int] = {}
    for seq in sched.running:
        assert len(seq.blocks) >= bm.blocks_needed(seq.num_computed)
        for b in seq.blocks:
            refs[b.id] = refs.get(b.id, 0) + 1
    for seq in sched.waiting:
        assert seq.blocks == [] and seq.num_computed == 0
    for block in bm.blocks:
        assert block.ref_cnt == refs.get(block.id, 0), f"block {block.id} ref count is off"
        assert (block.ref_cnt == 0) == bm.is_free(block)
    assert len(sched.running) <= sched.max_num_seqs


def run_to_completion(sched: Scheduler, *, rng: random.Random | None = None, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Drive the scheduler with fake sampling; returns each sequence's output tokens."""
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return outputs
        batch = sched.schedule()
        assert batch.num_tokens <= sched.max_num_batched_tokens
        check_invariants(sched)
        sched.after_step(batch)
        for seq, _ in list(batch.items()):
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append((seq.num_tokens * 7) % 1000)  # deterministic "sampling"
                if seq.num_output >= seq.params.max_tokens:
                    outputs[seq.request_id] = seq.output_ids
                    sched.remove(seq)
        check_invariants(sched)
    raise AssertionError("did not finish")


def test_all_blocks_return_after_completion():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32)
    for i in range(20):
        sched.add(make_seq(f"r{i}", 5 + i, max_tokens=3 + i % 5, start=i * 100))
    out = run_to_completion(sched)
    assert len(out) == 20
    assert bm.num_free == bm.num_blocks


def test_budgets_are_respected_and_prefill_is_chunked():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10)
    sched.add(make_seq("long", 37))
    sched.add(make_seq("b", 3))
    sched.add(make_seq("c", 3))
    batch = sched.schedule()
    assert batch.prefills == [(sched.running[0], 10)]
    sched.after_step(batch)
    steps = 1
    while sched.running[0].num_computed < 37:
        batch = sched.schedule()
        assert batch.num_tokens <= 10
        assert len(sched.running) <= 2
        sched.after_step(batch)
        steps += 1
    assert steps == 4  # 10 + 10 + 10 + 7


def test_preemption_frees_blocks_and_everyone_finishes():
    # 12 blocks of 4 tokens; 6 sequences each needing up to 5 blocks: preemption must happen
    bm = BlockManager(12, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=64)
    for i in range(6):
        sched.add(make_seq(f"r{i}", 6, max_tokens=14, start=i * 100))
    out = run_to_completion(sched)
    assert sched.num_preemptions > 0
    assert len(out) == 6 and all(len(v) == 14 for v in out.values())
    assert bm.num_free == bm.num_blocks


def test_preempted_sequences_recompute_the_same_tokens():
    small = Scheduler(BlockManager(12, 4, enable_prefix_caching=False), max_num_seqs=6, max_num_batched_tokens=64)
    big = Scheduler(BlockManager(200, 4, enable_prefix_caching=False), max_num_seqs=6, max_num_batched_tokens=64)
    for sched in (small, big):
        for i in range(6):
            sched.add(make_seq(f"r{i}", 6, max_tokens=14, start=i * 100))
    assert run_to_completion(small) == run_to_completion(big)
    assert small.num_preemptions > 0 and big.num_preemptions == 0


def test_abort_returns_every_block():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    seqs = [make_seq(f"r{i}", 9, start=i * 50) for i in range(5)]
    for s in seqs:
        sched.add(s)
    for _ in range(3):
        sched.after_step(sched.schedule())
    for s in seqs:
        sched.remove(s)
        assert s.status is Status.FINISHED
    assert bm.num_free == bm.num_blocks
    check_invariants(sched)


def test_prefix_cache_hits_share_blocks_and_salt_separates():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    first = make_seq("a", 13)
    sched.add(first)
    run_to_completion(sched)
    # same 13-token prompt: 3 full blocks cached (12 tokens); the last token is recomputed
    again = make_seq("b", 13)
    sched.add(again)
    batch = sched.schedule()
    assert again.num_cached_tokens == 12
    assert batch.decodes == [again]  # only 1 token left to compute
    run_to_completion(sched)
    salted = make_seq("c", 13, salt="tenant-2")
    sched.add(salted)
    sched.schedule()
    assert salted.num_cached_tokens == 0
    run_to_completion(sched)
    assert bm.num_free == bm.num_blocks


def test_prefix_cache_never_claims_the_whole_prompt():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make_seq("a", 8))
    run_to_completion(sched)
    seq = make_seq("b", 8)
    sched.add(seq)
    batch = sched.schedule()
    assert seq.num_cached_tokens == 4  # 2 full blocks cached, but the last token must be computed
    assert batch.prefills == [(seq, 4)]


def test_shared_blocks_survive_one_owner_leaving():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = make_seq("a", 12, max_tokens=30)
    sched.add(a)
    for _ in range(2):
        batch = sched.schedule()
        sched.after_step(batch)
        for seq, _ in batch.items():
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(1)
    b = make_seq("b", 12)
    sched.add(b)
    sched.schedule()
    shared = [blk for blk in b.blocks if blk in a.blocks]
    assert len(shared) == 2 and all(blk.ref_cnt == 2 for blk in shared)
    sched.remove(a)
    assert all(blk.ref_cnt == 1 for blk in shared)
    check_invariants(sched)
    sched.remove(b)
    assert bm.num_free == bm.num_blocks


def test_priority_policy_orders_admission_and_preempts_the_least_urgent():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64, policy="priority")
    low = make_seq("low", 4, priority=5)
    high = make_seq("high", 4, priority=-1, start=10)
    sched.add(low)
    sched.add(high)
    sched.schedule()
    assert sched.running == [high]


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_keep_invariants(seed):
    rng = random.Random(seed)
    bm = BlockManager(rng.randint(10, 40), rng.choice([1, 2, 4, 16]))
    sched = Scheduler(bm, max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.randint(8, 64))
    alive = []
    for step in range(400):
        if rng.random() < 0.3:
            n = rng.randint(1, min(30, bm.num_blocks * bm.block_size // 2))
            seq = make_seq(f"r{step}", n, max_tokens=rng.randint(1, 10), start=rng.choice([0, 500]))
            sched.add(seq)
            alive.append(seq)
        if alive and rng.random() < 0.05:
            victim = alive.pop(rng.randrange(len(alive)))
            if victim.status is not Status.FINISHED:
                sched.remove(victim)
        if not sched.has_work():
            continue
        batch = sched.schedule()
        sched.after_step(batch)
        for seq, _ in batch.items():
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(rng.randrange(1000))
                if seq.num_output >= seq.params.max_tokens:
                    sched.remove(seq)
        check_invariants(sched)
    for seq in list(sched.running) + list(sched.waiting):
        sched.remove(seq)
    assert bm.num_free == bm.num_blocks


# --------------------------------------------------------------------------- shared prefixes in flight


def shared_prefix_wave(prefix_len: int, fresh: int, n: int, salts: list[str | None] | None = None) -> list[Sequence]:
    """``n`` prompts arriving together: the same ``prefix_len`` tokens, then ``fresh`` tokens of their own."""
    prefix = [(7 * i) % 1000 for i in range(prefix_len)]
    return [Sequence(f"r{k}", prefix + [(1000 + 97 * k + j) % 50_000 for j in range(fresh)], SamplingParams(max_tokens=4),
                     sink=None, cache_salt=(salts or [None] * n)[k]) for k in range(n)]


def ttft_in_tokens(sched: Scheduler, seqs: list[Sequence]) -> tuple[dict[str, int], int]:
    """Run the wave; each sequence's time to first token measured in tokens computed (a step costs its
    tokens: the model's work is about linear in them at these sizes), and the prompt tokens computed."""
    for seq in seqs:
        sched.add(seq)
    clock, ttft, prompt_work = 0, {}, 0
    while sched.has_work():
        batch = sched.schedule()
        check_invariants(sched)
        clock += batch.num_tokens
        prompt_work += sum(n for _, n in batch.prefills)
        sched.after_step(batch)
        for seq, _ in list(batch.items()):
            if seq.num_computed == seq.num_tokens:
                ttft.setdefault(seq.request_id, clock)
                seq.token_ids.append(3)
                if seq.num_output >= seq.params.max_tokens:
                    sched.remove(seq)
    return ttft, prompt_work


def test_a_prompt_waits_for_the_shared_prefix_another_is_computing(monkeypatch):
    """Eight prompts with one 1000-token prefix + 50 tokens of their own, together (the race's shared-prefix
    row): held back one step, seven of them reuse the first one's prefix instead of computing it beside it."""
    import statistics

    def run(defer: bool) -> tuple[dict[str, int], int]:
        sched = Scheduler(BlockManager(2000, 16), max_num_seqs=64, max_num_batched_tokens=2048)
        if not defer:
            monkeypatch.setattr(sched, "_awaits_shared_prefix", lambda seq, prefilling: False)
        return ttft_in_tokens(sched, shared_prefix_wave(1000, 50, 8))

    with_, work = run(True)
    without, work_without = run(False)
    # 62 full blocks (992 tokens) shared: the first prompt computes 1050 tokens, each other one 58
    assert work == 1050 + 7 * 58
    assert work_without == 2 * 1050 + 6 * 58  # the second prompt computed the whole prefix beside the first
    assert statistics.median(with_.values()) < 0.65 * statistics.median(without.values())
    assert max(with_.values()) < max(without.values())


def test_a_short_shared_header_does_not_hold_prompts_back():
    """Prompts sharing only a chat template's first block (16 of 128 tokens) are all admitted at once."""
    sched = Scheduler(BlockManager(2000, 16), max_num_seqs=64, max_num_batched_tokens=2048)
    seqs = shared_prefix_wave(16, 112, 8)
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert [s for s, _ in batch.prefills] == seqs and not sched.waiting


def test_a_held_back_prompt_keeps_its_place_and_others_pass():
    sched = Scheduler(BlockManager(2000, 16), max_num_seqs=64, max_num_batched_tokens=2048)
    first, twin = shared_prefix_wave(1000, 50, 2)
    other = make_seq("other", 200, start=500)
    salted = shared_prefix_wave(1000, 50, 3, salts=[None, None, "tenant-2"])[2]  # another salt: no cache to share
    for seq in (first, twin, other, salted):
        sched.add(seq)
    batch = sched.schedule()
    assert [s for s, _ in batch.prefills] == [first, other, salted]
    assert list(sched.waiting) == [twin]
    sched.after_step(batch)
    batch = sched.schedule()  # the prefix is cached now: the twin computes only its own tail
    assert (twin, 58) in batch.prefills and twin.num_cached_tokens == 992
    check_invariants(sched)


def test_a_prompt_does_not_wait_for_a_prefix_that_is_already_cached():
    """Once the shared blocks are registered, a new prompt takes them at once."""
    sched = Scheduler(BlockManager(2000, 16), max_num_seqs=64, max_num_batched_tokens=2048)
    first, late = shared_prefix_wave(1000, 50, 2)
    sched.add(first)
    sched.after_step(sched.schedule())
    sched.add(late)
    batch = sched.schedule()
    assert (late, 58) in batch.prefills


def test_holding_back_is_bounded_per_step(monkeypatch):
    """A queue of twins looks only so deep per step, and every twin still gets the cached prefix."""
    from patchbay.engine import scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "MAX_DEFERRED", 3)
    sched = Scheduler(BlockManager(2000, 16), max_num_seqs=64, max_num_batched_tokens=4096)
    seqs = shared_prefix_wave(1000, 50, 6)
    other = make_seq("other", 100, start=500)
    for seq in (*seqs, other):
        sched.add(seq)
    batch = sched.schedule()
    assert [s for s, _ in batch.prefills] == [seqs[0]]  # three twins held back, then admission stopped
    assert list(sched.waiting) == [*seqs[1:], other]
    sched.after_step(batch)
    batch = sched.schedule()
    assert all((s, 58) in batch.prefills for s in seqs[1:]) and (other, 100) in batch.prefills


def test_lazy_pool_reuses_written_blocks_before_touching_fresh_ones():
    # one-off prompts one after another: the resident part stays at one request's blocks
    lazy, eager = BlockManager(64, 4, lazy=True), BlockManager(64, 4)
    for bm in (lazy, eager):
        sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
        for i in range(10):
            sched.add(make_seq(f"r{i}", 8, max_tokens=4, start=1000 + i * 100))
            run_to_completion(sched)
        assert bm.num_free == bm.num_blocks
    assert lazy.num_touched == 3  # 8 prompt + 4 output tokens (the last one never computed): 3 blocks
    assert eager.num_touched == 30  # vLLM's order: every request on fresh blocks


def test_lazy_pool_evicts_reused_prefixes_last():
    bm = BlockManager(8, 4, lazy=True)
    shared = bm.allocate(2)
    keys = bm.block_keys(list(range(8)), None, 2)
    for block, key in zip(shared, keys):
        bm.register(block, key)
    bm.release(shared)
    bm.take(bm.match_prefix(list(range(8)), None))  # a second request reuses the prefix
    bm.release(shared)
    once = bm.allocate(2)  # a one-off request, cached and freed
    for block, key in zip(once, bm.block_keys(list(range(100, 108)), None, 2)):
        bm.register(block, key)
    bm.release(once)
    assert bm.num_touched == 4
    # under pressure: the one-off blocks go first, then fresh ones, the reused prefix last
    got = bm.allocate(6)
    assert {b.id for b in got[:2]} == {b.id for b in once}
    assert not {b.id for b in got} & {b.id for b in shared}
    assert [b.id for b in bm.match_prefix(list(range(8)), None)] == [b.id for b in shared]
    assert bm.allocate(2) is not None and bm.match_prefix(list(range(8)), None) == []


def step(sched: Scheduler):
    """One scheduled step with fake sampling; the batch."""
    batch = sched.schedule()
    check_invariants(sched)
    sched.after_step(batch)
    for seq, _ in list(batch.items()):
        if seq.num_computed == seq.num_tokens:
            seq.token_ids.append(5)
    return batch


def test_prompt_tokens_beside_decodes_take_half_the_budget():
    """A burst of prompts fills whole steps; once sequences decode, the prompt tokens of a step are capped at
    half the budget (shorter steps: decoders' next tokens and finishing prompts come sooner), in chunks
    that never stop the prompts from progressing."""
    sched = Scheduler(BlockManager(512, 4), max_num_seqs=16, max_num_batched_tokens=64)
    sched.add(make_seq("a", 40, max_tokens=50))
    sched.add(make_seq("b", 40, max_tokens=50, start=100))
    first = step(sched)  # nobody decodes yet: the whole budget
    assert first.num_tokens == 64 and [n for _, n in first.prefills] == [40, 24]
    second = step(sched)  # a decodes now: b's last 16 prompt tokens fit under 32
    assert [s.request_id for s in second.decodes] == ["a"] and [n for _, n in second.prefills] == [16]
    sched.add(make_seq("c", 100, max_tokens=5, start=300))
    sched.add(make_seq("d", 10, max_tokens=5, start=500))
    chunks = []
    for _ in range(5):
        batch = step(sched)
        assert len(batch.decodes) >= 2
        prompt = sum(n for _, n in batch.prefills)
        assert prompt <= 32
        chunks.append([(s.request_id, n) for s, n in batch.prefills])
    assert chunks[:4] == [[("c", 32)], [("c", 32)], [("c", 32)], [("c", 4), ("d", 10)]]


def test_the_prompt_cap_leaves_pooling_and_tiny_budgets_alone():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=3)
    sched.add(make_seq("a", 2, max_tokens=20))
    sched.add(make_seq("b", 9, max_tokens=2, start=50))
    outputs = run_to_completion(sched)  # half of 3 is 1 token of prompt a step beside a decode: b still ends
    assert set(outputs) == {"a", "b"}
    pool = Scheduler(BlockManager(1, 4), max_num_seqs=8, max_num_batched_tokens=64, needs_kv=False)
    for i in range(3):
        pool.add(make_seq(f"p{i}", 20, start=i))
    batch = pool.schedule()
    assert [n for _, n in batch.prefills] == [20, 20, 20]
