"""The ``patchbay-bench`` client (patchbay_bench.client): its statistics and its console script, no server."""

from __future__ import annotations

import math
from importlib.metadata import entry_points

import pytest

from patchbay_bench import client


def test_console_script_runs_the_client(capsys):
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "patchbay-bench"]
    assert script.value == "patchbay_bench.client:main" and script.load() is client.main
    with pytest.raises(SystemExit) as exit_:
        client.main(["--help"])
    assert exit_.value.code == 0 and "--concurrency" in capsys.readouterr().out


def test_percentiles_and_summary_in_ms():
    assert client._percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert client._percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)
    assert math.isnan(client._percentile([], 0.5))
    assert client._summary([0.001, 0.003]) == pytest.approx({"mean": 2.0, "median": 2.0, "p99": 2.98})


def test_random_prompts_are_fresh_per_seed_and_skip_low_ids():
    a = client.random_prompts(4, 16, 100, seed=1)
    assert a == client.random_prompts(4, 16, 100, seed=1) != client.random_prompts(4, 16, 100, seed=2)
    assert len(a) == 4 and all(len(p) == 16 and min(p) >= 16 and max(p) < 100 for p in a)
