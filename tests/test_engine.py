"""The shared engine end to end on a tiny model: batching, chunking, preemption, aborts, prefix cache."""

from __future__ import annotations

import asyncio
import random

import pytest

from enginekit import build_serving, free_blocks_when_idle, run_many
from patchbay.engine.params import SamplingParams


def prompts(n: int, *, seed: int = 0, lo: int = 5, hi: int = 60, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def serving(tiny_llama):
    s = build_serving(tiny_llama)
    s.start()
    yield s
    s.stop()


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_concurrent_greedy_equals_one_by_one(serving):
    ps = prompts(16, seed=1)
    alone = run_many(serving.engine, ps, greedy(), concurrent=False, prefix="a")
    together = run_many(serving.engine, ps, greedy(), concurrent=True, prefix="b")
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.text for o in together] == [o.text for o in alone]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in together)
    free, total = free_blocks_when_idle(serving.engine)
    assert free == total


def test_torch_kernel_paths_give_the_same_tokens(tiny_llama, serving, monkeypatch):
    """The engine's batches on the torch paths (``PATCHBAY_NO_CPP_KERNELS=1``: decode slots
    derived from the block tables) generate what the C++ kernels generate."""
    ps = prompts(6, seed=7)
    reference = run_many(serving.engine, ps, greedy(10), prefix="cpp")
    monkeypatch.setenv("PATCHBAY_NO_CPP_KERNELS", "1")
    s = build_serving(tiny_llama)
    s.start()
    try:
        got = run_many(s.engine, ps, greedy(10), prefix="torch")
    finally:
        s.stop()
    assert [o.token_ids for o in got] == [o.token_ids for o in reference]


def test_chunked_prefill_and_tiny_cache_give_the_same_tokens(tiny_llama, serving):
    ps = prompts(8, seed=2, lo=30, hi=90)
    reference = run_many(serving.engine, ps, greedy(20), prefix="ref")
    # 7-token steps force chunked prefill; 40 blocks of 4 tokens force preemption
    other = build_serving(tiny_llama, max_num_batched_tokens=7, block_size=4, kv_cache_memory=_blocks_bytes(serving, 40, 4),
                          max_model_len=120, enable_prefix_caching=False)
    other.start()
    try:
        got = run_many(other.engine, ps, greedy(20), prefix="small")
        assert [o.token_ids for o in got] == [o.token_ids for o in reference]
        assert other.engine.scheduler.num_preemptions > 0
        free, total = free_blocks_when_idle(other.engine)
        assert free == total
    finally:
        other.stop()


def _blocks_bytes(serving, blocks: int, block_size: int) -> int:
    from patchbay.engine.runner import kv_block_bytes

    return blocks * kv_block_bytes(serving.engine.runner.model.kv_layout, block_size, serving.engine.runner.model.dtype)


def test_prefix_cache_reuse_matches_fresh_compute(serving):
    shared = prompts(1, seed=3, lo=70, hi=70)[0]
    ps = [shared + tail for tail in prompts(4, seed=4, lo=3, hi=9)]
    first = run_many(serving.engine, ps, greedy(), concurrent=False, prefix="p1")
    hits_before = serving.engine.scheduler.blocks.hits
    second = run_many(serving.engine, ps, greedy(), concurrent=True, prefix="p2")
    assert serving.engine.scheduler.blocks.hits > hits_before
    assert all(o.num_cached_tokens >= 64 for o in second)
    assert [o.token_ids for o in second] == [o.token_ids for o in first]


def test_a_wave_with_one_long_prefix_computes_it_once(tiny_llama, serving):
    """Six prompts with the same 200-token prefix reach the engine in one batch (held behind a gate on
    the engine thread): the first computes the prefix, the other five wait a step and reuse it from the
    prefix cache (without that they would all fit in the first step and share nothing)."""
    import threading

    from enginekit import collect

    shared = prompts(1, seed=11, lo=200, hi=200)[0]
    ps = [shared + tail for tail in prompts(6, seed=12, lo=4, hi=8)]
    fresh = build_serving(tiny_llama)
    fresh.start()
    try:
        gate = threading.Event()

        async def wave() -> list:
            fresh.engine.call(lambda: gate.wait(10))
            tasks = [asyncio.ensure_future(collect(fresh.engine, f"w{i}", p, greedy())) for i, p in enumerate(ps)]
            await asyncio.sleep(0.3)  # every request is in the engine's inbox, behind the gate
            gate.set()
            return list(await asyncio.gather(*tasks))

        got = asyncio.run(wave())
        block = fresh.engine.scheduler.blocks.block_size
    finally:
        fresh.stop()
    assert sorted(o.num_cached_tokens for o in got) == [0] + [200 // block * block] * 5
    alone = run_many(serving.engine, ps, greedy(), concurrent=False, prefix="w-alone")
    assert [o.token_ids for o in got] == [o.token_ids for o in alone]


def test_seeded_sampling_does_not_depend_on_the_batch(serving):
    p = prompts(1, seed=5)[0]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_many(serving.engine, [p], params, prefix="s1")[0]
    others = prompts(7, seed=6)
    mixed = run_many(serving.engine, others + [p],
                     [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * 7 + [params], prefix="s2")
    assert mixed[-1].token_ids == alone.token_ids
    different = run_many(serving.engine, [p], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True),
                         prefix="s3")[0]
    assert different.token_ids != alone.token_ids


def test_abort_returns_blocks(serving):
    async def main():
        gen = serving.engine.generate("abort-me", prompts(1, seed=7)[0], greedy(400))
        got = 0
        async for out in gen:
            got += len(out.token_ids)
            if got >= 3:
                break
        await gen.aclose()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    free, total = free_blocks_when_idle(serving.engine)
    assert free == total


def test_eos_stops_unless_ignored(tiny_llama):
    s = build_serving(tiny_llama)
    p = prompts(1, seed=8)[0]
    s.start()
    try:
        first = run_many(s.engine, [p], greedy(6))[0]
        # pretend the model's 3rd greedy token is an EOS token
        s.engine.stopper.eos_ids = frozenset({first.token_ids[2]})
        stopped = run_many(s.engine, [p], SamplingParams(max_tokens=6, temperature=0.0), prefix="e")[0]
        assert stopped.finish_reason == "stop" and stopped.token_ids == first.token_ids[:3]
        assert stopped.stop_reason is None
        ignored = run_many(s.engine, [p], greedy(6), prefix="i")[0]
        assert ignored.token_ids == first.token_ids and ignored.finish_reason == "length"
    finally:
        s.stop()


def test_stop_token_ids_and_stop_strings(serving):
    p = prompts(1, seed=9)[0]
    first = run_many(serving.engine, [p], greedy(10), prefix="f")[0]
    k = next(i for i in range(2, 10) if first.token_ids[i] not in first.token_ids[:i])
    stop_tok = first.token_ids[k]
    out = run_many(serving.engine, [p], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_tok,)),
                   prefix="st")[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == first.token_ids[: k + 1]
    text = first.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.find(stop)
    out = run_many(serving.engine, [p], SamplingParams(max_tokens=10, temperature=0.0, stop=(stop,)), prefix="ss")[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:cut]
    out = run_many(serving.engine, [p], SamplingParams(max_tokens=10, temperature=0.0, stop=(stop,),
                                                       include_stop_str_in_output=True), prefix="si")[0]
    assert out.text == text[: cut + len(stop)]


def test_streamed_text_never_leaks_part_of_a_stop_string(serving):
    p = prompts(1, seed=10)[0]
    text = run_many(serving.engine, [p], greedy(16), prefix="lk")[0].text
    stop = text[-6:-1]
    cut = text.find(stop)

    async def main():
        pieces = []
        async for out in serving.engine.generate("leak", p, SamplingParams(max_tokens=16, temperature=0.0, stop=(stop,))):
            pieces.append(out.text)
        return pieces

    pieces = asyncio.run(main())
    assert "".join(pieces) == text[:cut]


def test_context_end_finishes_with_length(tiny_llama):
    s = build_serving(tiny_llama, max_model_len=40)
    s.start()
    try:
        out = run_many(s.engine, [prompts(1, seed=11, lo=35, hi=35)[0]], greedy(100))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 5
    finally:
        s.stop()


def test_priority_order_under_load(tiny_llama):
    s = build_serving(tiny_llama, scheduling_policy="priority", max_num_seqs=1)
    s.start()
    try:
        p = prompts(1, seed=12)[0]
        order: list[str] = []

        async def run(name: str, priority: int, max_tokens: int, started: asyncio.Event | None = None):
            async for out in s.engine.generate(name, p, greedy(max_tokens), priority=priority):
                if started is not None and not started.is_set():
                    started.set()
                if out.finished:
                    order.append(name)

        async def main():
            started = asyncio.Event()
            long = asyncio.ensure_future(run("long-low", 5, 120, started))
            await started.wait()
            waiting = [asyncio.ensure_future(run(f"p{prio}", prio, 4)) for prio in (3, 1, 2, 0)]
            await asyncio.gather(long, *waiting)

        asyncio.run(main())
        assert order[:4] == ["p0", "p1", "p2", "p3"], order
        assert order[-1] == "long-low"
        assert s.engine.scheduler.num_preemptions >= 1  # the urgent ones preempted the running one
        free, total = free_blocks_when_idle(s.engine)
        assert free == total
    finally:
        s.stop()


@pytest.mark.parametrize("threads,allowed", [(2, True), (1, False)])
def test_engine_allows_the_gemv_helper_with_two_threads(tiny_llama, monkeypatch, threads, allowed):
    """``--cpu-threads 2``: small steps' matrix-vector products may use a helper thread; with one
    thread they may not (the flag is read on the engine thread once it has started)."""
    import threading

    from patchbay_kernels import cpp

    monkeypatch.setattr(cpp.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    ops = cpp.load()
    before = ops.set_gemv_helper(not allowed)
    s = build_serving(tiny_llama, cpu_threads=threads)
    s.start()
    try:
        seen, done = [], threading.Event()
        s.engine.call(lambda: (seen.append(ops.set_gemv_helper(allowed)), done.set()))
        assert done.wait(10)
        assert seen == [allowed]
    finally:
        s.stop()
        ops.set_gemv_helper(before)


def test_serving_is_built_in_a_thread_that_ends():
    """Serving.build loads in a thread of its own (its OpenMP pool ends with it): the result and the
    exceptions come back to the caller."""
    import threading

    from patchbay.serving import run_in_fresh_thread

    seen = []

    def work(x):
        seen.append(threading.current_thread())
        return x * 2

    assert run_in_fresh_thread(work, 21) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="boom"):
        run_in_fresh_thread(lambda: {}["boom"])
