"""One sequence's state in the engine: tokens, progress, blocks, output sink."""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any, Callable

from patchbay.engine.params import SamplingParams

_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request as the engine runs it (one completion choice).

    ``token_ids`` is prompt + output. ``num_computed`` tokens of it have their
    K/V in the cache; each step schedules the next chunk of the rest. The
    sequence is sampled from when a step brings ``num_computed`` to
    ``len(token_ids)``.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[Any], None],
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        pooling: Any = None,
        encoder_input: Any = None,
        mm: Any = None,
    ):
        self.request_id = request_id
        self.prompt_len = len(prompt_ids)
        self.token_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.priority = priority
        #: what the model's encoder takes for this sequence (an encoder-decoder's audio window; a multimodal
        #: model's items), handed to the encoder once by the runner and then dropped
        self.encoder_input = encoder_input
        #: what the encoder returned for it (cross-attention keys / values), held until the sequence ends
        #: (kept through preemption: it is not in the paged cache)
        self.encoder_state: Any = None
        self.arrival = next(_arrivals)
        # the K/V of a sequence with encoder inputs depend on them, not only on its tokens: its blocks are
        # never shared with another sequence (its own recompute after preemption still finds them)
        self.cache_salt = cache_salt if encoder_input is None else f"{cache_salt}|encoder:{request_id}:{self.arrival}"
        #: a :class:`~patchbay.engine.params.PoolingParams` for encode requests (no sampling)
        self.pooling = pooling
        #: the prompt's images (a :class:`~patchbay.model.MultimodalInputs`), or None
        self.mm = mm
        #: monotonic clock at submission, and at its latest sampled token (for latency metrics)
        self.arrival_time = time.monotonic()
        self.last_token_time: float | None = None
        self.status = Status.WAITING
        self.num_computed = 0
        self.num_cached_tokens = 0
        self.blocks: list[Any] = []
        #: chain key of the last full block registered in the prefix cache
        self.last_key: Any = None
        self.num_registered_blocks = 0
        self.generator: Any = None
        self.detok: Any = None
        self.num_emitted_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.num_preemptions = 0
        #: structured-output state (a ``patchbay.decoding.Matcher``), when the request is constrained
        self.matcher: Any = None  # made on the engine thread (matchers are driven from one thread)
        #: prompt log-probabilities, filled at prefill when asked for
        self.prompt_lp: list[Any] | None = None
        self.prompt_lp_sent = False
        self.cumulative_logprob = 0.0
        #: logprob entries of output tokens not yet delivered
        self.pending_lp: list[Any] = []
        self.pending_offsets: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    def __repr__(self) -> str:
        return f"Sequence({self.request_id!r}, {self.status.value}, computed={self.num_computed}/{self.num_tokens})"
