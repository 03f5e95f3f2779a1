"""Request counters and latency histograms of one engine, counted on the engine thread once per step.

Each step takes one clock reading; every sequence that got a token in it adds
one time-to-first-token or inter-token sample, every sequence that ended adds
its end-to-end latency, token counts and finish reason. Histograms are plain
bucket counts (no locks: only the engine thread writes them); ``/metrics``
reads a snapshot. The buckets are vLLM's, so dashboards built for vLLM read
these unchanged.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def one_two_five(limit: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's token-count buckets)."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > limit:
                return tuple(float(v) for v in out)
            out.append(value)
        exponent += 1


class Histogram:
    """Cumulative-ready bucket counts (the last bucket is +Inf) and the sum of observations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[tuple[float, ...], tuple[int, ...], float]:
        """``(upper bounds, cumulative counts incl. +Inf, sum)``."""
        total, cumulative = 0, []
        for c in list(self.counts):
            total += c
            cumulative.append(total)
        return self.bounds, tuple(cumulative), self.sum


class RequestMetrics:
    """What one engine counts about requests (engine thread only)."""

    def __init__(self, max_model_len: int):
        self.prompt_tokens = 0
        self.finished: dict[str, int] = {}
        token_buckets = one_two_five(max_model_len)
        self.histograms: dict[str, Histogram] = {
            "time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
            "inter_token_latency_seconds": Histogram(ITL_BUCKETS),
            "e2e_request_latency_seconds": Histogram(E2E_BUCKETS),
            "request_prompt_tokens": Histogram(token_buckets),
            "request_generation_tokens": Histogram(token_buckets),
        }

    def tokens(self, now: float, seqs: Any) -> None:
        """One step's sampled sequences: a first token adds a TTFT sample (and counts the prompt), a later
        one an inter-token sample."""
        ttft = self.histograms["time_to_first_token_seconds"]
        itl = self.histograms["inter_token_latency_seconds"]
        for seq in seqs:
            last = seq.last_token_time
            if last is None:
                ttft.observe(now - seq.arrival_time)
                self.prompt_tokens += seq.prompt_len
            else:
                itl.observe(now - last)
            seq.last_token_time = now

    def finish(self, now: float, seq: Any, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if seq.last_token_time is None and reason in ("stop", "length"):
            self.prompt_tokens += seq.prompt_len  # pooled: no sampled token, the prompt was run all the same
        self.histograms["e2e_request_latency_seconds"].observe(now - seq.arrival_time)
        self.histograms["request_prompt_tokens"].observe(seq.prompt_len)
        self.histograms["request_generation_tokens"].observe(seq.num_output)

    def snapshot(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "finished": dict(self.finished),
                "histograms": {name: h.snapshot() for name, h in self.histograms.items()}}


def now() -> float:
    return time.monotonic()
