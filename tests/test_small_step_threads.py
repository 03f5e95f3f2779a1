"""The engine measures whether its small steps (one or two tokens) run faster on one torch thread or
on all of them, per model and machine, and the choice never changes what is generated."""

from __future__ import annotations

import pytest

from enginekit import build_serving, run_many
from patchbay.engine.params import SamplingParams
from patchbay.engine.threads import SmallStepThreads


def measure(chooser: SmallStepThreads, cost: dict[int, float], steps: int) -> list[int]:
    picked = []
    for _ in range(steps):
        t = chooser.pick()
        picked.append(t)
        chooser.record(t, cost[t])
    return picked


@pytest.mark.parametrize("cost,want", [({1: 0.010, 2: 0.007}, 2), ({1: 0.005, 2: 0.009}, 1)])
def test_the_faster_count_wins_after_alternating_probes(cost, want):
    c = SmallStepThreads(2)
    probes = c.SKIP + 2 * c.PROBES
    picked = measure(c, cost, probes)
    probing = picked[c.SKIP:]  # (the skipped first steps run on one thread)
    assert probing.count(1) == probing.count(2) == c.PROBES  # alternating: both see the same contexts
    assert all(a != b for a, b in zip(probing, probing[1:]))
    assert c.choice == want
    assert set(measure(c, cost, 100)) == {want}


def test_a_tie_keeps_one_thread_and_medians_ignore_outliers():
    c = SmallStepThreads(2)
    measure(c, {1: 0.004, 2: 0.004}, c.SKIP + 2 * c.PROBES)
    assert c.choice == 1
    c = SmallStepThreads(2)
    for i in range(c.SKIP + 2 * c.PROBES):
        t = c.pick()
        slow = i % 7 == 0  # a few one-thread steps stalled (another process held the core)
        c.record(t, {1: 0.050 if slow else 0.004, 2: 0.006}[t])
    assert c.choice == 1


def test_it_measures_again_after_a_while():
    c = SmallStepThreads(2)
    measure(c, {1: 0.004, 2: 0.006}, c.SKIP + 2 * c.PROBES)
    assert c.choice == 1
    measure(c, {1: 0.004, 2: 0.006}, c.EVERY - 1)
    assert c.choice == 1
    measure(c, {1: 0.009, 2: 0.006}, 1)  # the next measurement starts (no skip this time)
    assert c.choice is None
    picked = measure(c, {1: 0.009, 2: 0.006}, 2 * c.PROBES)
    assert picked.count(1) == picked.count(2) and c.choice == 2


def test_engine_measures_small_steps_and_tokens_do_not_depend_on_it(tiny_llama, monkeypatch):
    """With two threads, single-stream steps run alternately on one and two threads until one is chosen,
    and a greedy stream equals the one-thread engine's token for token."""
    import torch

    counts: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (counts.append(n), real(n))[1])
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    prompts = [[11, 12, 13, 14], [40, 41, 42, 43, 44, 45], [7] * 9]
    two = build_serving(tiny_llama, cpu_threads=2)
    two.start()
    try:
        got = run_many(two.engine, prompts, params, concurrent=False, prefix="two")
        chooser = two.engine._small
        assert chooser is not None and chooser.choice in (1, 2)
    finally:
        two.stop()
    assert 1 in counts and 2 in counts
    one = build_serving(tiny_llama, cpu_threads=1)
    one.start()
    try:
        want = run_many(one.engine, prompts, params, concurrent=False, prefix="one")
    finally:
        one.stop()
    assert one.engine._small is None
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_the_choice_is_logged_when_it_changes(caplog):
    import logging

    c = SmallStepThreads(2)
    with caplog.at_level(logging.INFO, logger="patchbay.engine"):
        measure(c, {1: 0.004, 2: 0.006}, c.SKIP + 2 * c.PROBES)
        measure(c, {1: 0.004, 2: 0.006}, c.EVERY + 2 * c.PROBES)  # measured again: the same choice
        measure(c, {1: 0.009, 2: 0.006}, c.EVERY + 2 * c.PROBES)  # and again: a new one
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 2 and lines[0].endswith("running them on 1") and lines[1].endswith("running them on 2")
