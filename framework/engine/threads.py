"""How many torch threads the engine's small steps run on: measured, per model and machine.

A step of one or two tokens (one or two sequences decoding) is bound by reading the weights
once; whether a second torch thread pays for waking it depends on the model, the machine and
what else holds the cores. Measured on the same machine on different days: the benchmark llama's
single stream once ran 20% faster on both threads and once 11% slower (100.5 against 112.9
tok/s); the benchmark Whisper's single stream ran at half the speed on both (every parallel
region waits for a core the HTTP side may hold). So the engine does not guess: the first small steps alternate between one thread and all of them, and the faster
(median wall time of the paired samples) runs the small steps until the next measurement.
The numbers do not depend on the choice: every op the small steps use gives the same result on
one thread and on several (the same switch has always run small and large steps on different
counts).
"""

from __future__ import annotations

import logging
import statistics

import torch

log = logging.getLogger("patchbay.engine")

#: steps of at most this many tokens are small (larger ones run on all the engine's threads)
SMALL_STEP_TOKENS = 2


class SmallStepThreads:
    """Picks the thread count of small steps: :meth:`before` every step, :meth:`record` after a small one."""

    #: samples of each choice per measurement (alternating, so both see the same contexts)
    PROBES = 16
    #: small steps skipped before measuring (first-call costs: kernel builds, allocator growth)
    SKIP = 8
    #: small steps between two measurements (contexts grow, traffic changes)
    EVERY = 4096

    def __init__(self, threads: int):
        self.threads = threads
        self.current = threads  # torch's thread count on the engine thread now
        self.choice: int | None = None  # None: measuring
        self._samples: dict[int, list[float]] = {1: [], threads: []}
        self._skip = self.SKIP
        self._since = 0
        self._last: int | None = None

    def before(self, small: bool) -> None:
        """Set the engine thread's torch thread count for the next step (small or not)."""
        want = self.pick() if small else self.threads
        if want != self.current:
            torch.set_num_threads(want)
            self.current = want

    def pick(self) -> int:
        if self.choice is not None:
            return self.choice
        one, all_ = self._samples[1], self._samples[self.threads]
        return 1 if len(one) <= len(all_) else self.threads

    def record(self, threads: int, seconds: float) -> None:
        """A small step ran on ``threads`` in ``seconds`` (wall time of the model step)."""
        if self.choice is not None:
            self._since += 1
            if self._since >= self.EVERY:  # measure again
                self.choice, self._since = None, 0
                for v in self._samples.values():
                    v.clear()
            return
        if self._skip:
            self._skip -= 1
            return
        if threads not in self._samples:
            return
        self._samples[threads].append(seconds)
        if min(len(v) for v in self._samples.values()) >= self.PROBES:
            medians = {t: statistics.median(v) for t, v in self._samples.items()}
            self.choice = min(medians, key=lambda t: (medians[t], t))
            # logged when the choice changes (the first time included), else only at debug level
            level = logging.INFO if self.choice != self._last else logging.DEBUG
            log.log(level, "small steps: %.2f ms on one thread, %.2f ms on %d; running them on %d",
                    1000 * medians[1], 1000 * medians[self.threads], self.threads, self.choice)
            self._last = self.choice
