"""The engine: one loop, off the HTTP event loop, that every endpoint submits to.

HTTP handlers call :meth:`Engine.generate`, an async iterator of
:class:`RequestOutput` deltas. The loop runs in its own thread: it takes new
requests and aborts from a thread-safe inbox, schedules a step, runs the
model, turns new tokens into text, checks stop conditions, and hands each
event loop one batch of deltas per step (``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterable

import torch

import attrs

from patchbay.engine.detokenizer import IncrementalDetokenizer
from patchbay.engine.metrics import RequestMetrics, now
from patchbay.errors import APIError
from patchbay.engine.params import PoolingParams, RequestOutput, SamplingParams
from patchbay.engine.runner import EncoderRunner, ModelRunner
from patchbay.engine.scheduler import Scheduler
from patchbay.engine.sequence import Sequence, Status
from patchbay.engine.stopping import Stopper
from patchbay.engine.threads import SMALL_STEP_TOKENS, SmallStepThreads

log = logging.getLogger("patchbay.engine")


class EngineDeadError(RuntimeError):
    pass


class QueueFullError(APIError):
    """The engine's waiting queue is at ``--max-waiting-seqs``: a 429 with ``Retry-After``, at once.

    Checked once per request, before it submits anything (a request's own sequences are never split
    between admitted and refused): see :meth:`Engine.admit`."""

    def __init__(self, limit: int):
        super().__init__(f"The server is overloaded: {limit} sequences are already waiting "
                         "(--max-waiting-seqs). Retry shortly.", status=429, code="server_overloaded",
                         headers={"Retry-After": "1"})


class Admission:
    """Places in an engine's waiting queue that one admitted request holds until its sequences are
    submitted: between the check and the submission an endpoint awaits (a stream's first byte, a
    constraint), and every request that arrived meanwhile must see these places taken.

    :meth:`Engine.admit` makes one and puts it in the caller's context (``contextvars``: tasks the
    request starts inherit it); each sequence the request then submits through
    :meth:`Engine.generate` turns one place into a submitted sequence. What is left when the request
    ends is given back by :meth:`release` (or when the admission is garbage: a stream never started)."""

    __slots__ = ("_engine", "left")

    def __init__(self, engine: "Engine", count: int):
        self._engine = engine
        self.left = count

    def enter(self) -> None:
        """Make this the admission of the current context (where a request's work runs later)."""
        _ADMISSION.set(self)

    def release(self) -> None:
        engine = self._engine
        with engine._count_lock:
            engine._reserved -= self.left
            self.left = 0

    def __del__(self) -> None:
        if self.left:
            self.release()


_ADMISSION: contextvars.ContextVar[Admission | None] = contextvars.ContextVar("patchbay_admission", default=None)


@attrs.frozen
class EngineStats:
    """A snapshot of an engine's gauges and counters (for ``/metrics`` and ``/health``)."""

    #: sequences in the running batch / waiting to be scheduled
    running: int
    waiting: int
    #: KV cache blocks in all, free (empty or evictable), and the fraction in use
    total_blocks: int
    free_blocks: int
    kv_cache_usage: float
    #: sequences preempted for recompute, tokens generated, steps run
    preemptions: int
    generated_tokens: int
    steps: int
    #: prompts looked up in the prefix cache, and those that reused cached blocks
    prefix_cache_queries: int
    prefix_cache_hits: int
    #: why the engine stopped, when it died (None: alive)
    dead: str | None
    #: prompt tokens of requests that ran; prefix-cache lookups and hits counted in tokens
    prompt_tokens: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    #: ended requests by finish reason (stop, length, abort, error)
    finished: dict = attrs.Factory(dict)
    #: name -> (upper bounds, cumulative counts incl. +Inf, sum), see :mod:`patchbay.engine.metrics`
    histograms: dict = attrs.Factory(dict)


class _Sink:
    """Where one sequence's deltas go: an asyncio queue on the caller's loop."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


def _cat(a: list | None, b: list | None) -> list | None:
    if a is None:
        return b
    return a + (b or [])


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    return RequestOutput(
        request_id=a.request_id,
        token_ids=a.token_ids + b.token_ids,
        text=a.text + b.text,
        num_prompt_tokens=b.num_prompt_tokens,
        num_output_tokens=b.num_output_tokens,
        finish_reason=b.finish_reason,
        stop_reason=b.stop_reason,
        num_cached_tokens=b.num_cached_tokens,
        error=b.error,
        logprobs=_cat(a.logprobs, b.logprobs),
        prompt_logprobs=a.prompt_logprobs or b.prompt_logprobs,
        cumulative_logprob=b.cumulative_logprob,
        text_offsets=_cat(a.text_offsets, b.text_offsets),
        encoder_result=b.encoder_result,
    )


class Engine:
    def __init__(
        self,
        runner: ModelRunner | EncoderRunner,
        scheduler: Scheduler,
        tokenizer: Any,
        *,
        eos_token_ids: Iterable[int],
        max_model_len: int,
        threads: int | None = None,
        max_waiting: int | None = None,
    ):
        self.runner = runner
        #: most sequences waiting (submitted, not yet running) before new ones are refused (None: no bound)
        self.max_waiting = max_waiting
        self._submitted = 0  # adds put in the inbox (any thread, under the lock) ...
        self._drained = 0  # ... and taken out of it (engine thread)
        self._reserved = 0  # places held by admitted requests for sequences not submitted yet
        self._count_lock = threading.RLock()  # re-entrant: an Admission's __del__ may run while it is held
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.special_ids = frozenset(tokenizer.all_special_ids or ())
        self.max_model_len = max_model_len
        #: every rule that ends a sequence (EOS ids included)
        self.stopper = Stopper(eos_token_ids, max_model_len)
        self.threads = threads
        self._small = SmallStepThreads(threads) if threads and threads > 1 else None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._by_id: dict[str, Sequence] = {}
        self.metrics = RequestMetrics(max_model_len)
        self.dead: str | None = None
        self.steps = 0
        self.generated_tokens = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="patchbay-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------ API (any thread / event loop)

    def stats(self) -> EngineStats:
        """Gauges and counters, read without locking: each value is a snapshot of one int."""
        sched = self.scheduler
        blocks = sched.blocks
        counted = self.metrics.snapshot()
        return EngineStats(
            running=len(sched.running), waiting=len(sched.waiting), total_blocks=blocks.num_blocks,
            free_blocks=blocks.num_free, kv_cache_usage=blocks.usage(), preemptions=sched.num_preemptions,
            generated_tokens=self.generated_tokens, steps=self.steps, prefix_cache_queries=blocks.queries,
            prefix_cache_hits=blocks.hits, dead=self.dead, prompt_tokens=counted["prompt_tokens"],
            prefix_cache_query_tokens=blocks.query_tokens, prefix_cache_hit_tokens=blocks.hit_tokens,
            finished=counted["finished"], histograms=counted["histograms"],
        )

    def num_waiting(self) -> int:
        """Sequences not yet running: admitted and not submitted yet, in the inbox, or in the scheduler's
        waiting queue."""
        return self._reserved + self._submitted - self._drained + len(self.scheduler.waiting)

    def admit(self, count: int = 1) -> Admission:
        """Admit a request of ``count`` sequences, or raise :class:`QueueFullError` when the waiting queue
        is full (see ``max_waiting``): check and reservation are one step, so requests admitted at the
        same moment are all counted. A request is admitted whole while the queue is not full (the bound
        is passed by at most one request's sequences). The admission becomes the current context's."""
        with self._count_lock:
            if self.max_waiting is not None and self.num_waiting() >= self.max_waiting:
                raise QueueFullError(self.max_waiting)
            self._reserved += count
            admission = Admission(self, count)
        admission.enter()
        return admission

    async def encode(
        self, request_id: str, prompt_ids: list[int], pooling: PoolingParams, *, priority: int = 0, mm: Any = None
    ) -> RequestOutput:
        """Run a pooling request (no sampling); the output's ``pooled`` holds its vector."""
        last = None
        params = SamplingParams(max_tokens=1, detokenize=False)
        async for out in self.generate(request_id, prompt_ids, params, priority=priority, pooling=pooling, mm=mm):
            last = out
        assert last is not None
        return last

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        pooling: PoolingParams | None = None,
        encoder_input: Any = None,
        mm: Any = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a sequence and yield its output deltas; the last one has ``finish_reason``.

        ``encoder_input`` is what an encoder-decoder model's encoder takes for it (see
        :class:`patchbay.model.EncoderDecoderModel`); the last delta then carries the model's
        ``encoder_result``. ``mm``: the prompt's images (a :class:`~patchbay.model.MultimodalInputs`).
        Leaving the iteration early (the client went away) aborts the sequence and returns its blocks
        and its encoder state.
        """
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        with self._count_lock:
            self._submitted += 1
            admission = _ADMISSION.get()
            if admission is not None and admission._engine is self and admission.left > 0:
                admission.left -= 1  # an admitted place becomes this submitted sequence
                self._reserved -= 1
        sink = _Sink(asyncio.get_running_loop())
        seq = Sequence(request_id, prompt_ids, params, sink, priority=priority, cache_salt=cache_salt,
                       pooling=pooling, encoder_input=encoder_input, mm=mm)
        self._inbox.put(("add", seq))
        self._wake.set()
        finished = False
        try:
            while True:
                out = await sink.queue.get()
                while not out.finished and not sink.queue.empty():
                    out = _merge(out, sink.queue.get_nowait())
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", seq))
                self._wake.set()

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the engine thread between steps (for tests and admin)."""
        self._inbox.put(("call", fn))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.runner.device.type == "cpu":
            from patchbay_kernels import cpp

            # small steps run on one torch thread; their matrix-vector products may still use a second core
            cpp.allow_helper_thread(bool(self.threads and self.threads > 1))
        try:
            while True:
                self._drain_inbox()
                if self._stopping:
                    break
                if not self.scheduler.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as exc:  # the loop itself broke: fail everyone, refuse new work
            log.exception("engine loop died")
            self.dead = f"the engine stopped: {type(exc).__name__}: {exc}"
            self._fail(list(self._by_id.values()), self.dead)
        finally:
            self._abort_all()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._drained += 1
                self._add(item)
            elif kind == "abort":
                seq = item
                if seq.status is not Status.FINISHED and self._by_id.get(seq.request_id) is seq:
                    self._finish(seq)
            elif kind == "call":
                item()

    def _add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            self._send([(seq, self._output(seq, [], "", "error", error=f"duplicate request id {seq.request_id!r}"))])
            return
        if seq.params.constraint is not None:
            try:
                seq.matcher = seq.params.constraint.matcher()
            except Exception as exc:  # noqa: BLE001 - a backend failure fails this request only
                log.exception("constraint matcher failed for %s", seq.request_id)
                self._send([(seq, self._output(seq, [], "", "error", error=f"constraint failed: {exc}"))])
                return
        if seq.params.detokenize:
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.token_ids, seq.params, self.special_ids)
        self._by_id[seq.request_id] = seq
        self.scheduler.add(seq)

    def _finish(self, seq: Sequence, reason: str | None = None, completed: bool = False) -> Any:
        """Take ``seq`` out for good (counted as finished for ``reason``, else its own finish reason): its
        blocks and encoder state are freed; returns the model's report on its encoder state (``completed``
        ones only)."""
        if self._by_id.get(seq.request_id) is seq:
            self.metrics.finish(now(), seq, reason or seq.finish_reason or "abort")
        self.scheduler.remove(seq)
        self._by_id.pop(seq.request_id, None)
        if seq.encoder_state is None:
            seq.encoder_input = None
            return None
        try:
            return self.runner.release(seq, completed)
        except Exception:  # noqa: BLE001 - a failing report fails no one else
            log.exception("releasing the encoder state of %s failed", seq.request_id)
            return None

    def _abort_all(self) -> None:
        for seq in list(self._by_id.values()):
            self._send([(seq, self._output(seq, [], "", "abort"))])
            self._finish(seq)

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        items = []
        for seq in seqs:
            items.append((seq, self._output(seq, [], "", "error", error=message)))
            self._finish(seq, "error")
        self._send(items)

    @staticmethod
    def _output(seq: Sequence, tokens: list[int], text: str, finish: str | None, error: str | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=tokens,
            text=text,
            num_prompt_tokens=seq.prompt_len,
            num_output_tokens=seq.num_output,
            finish_reason=finish,
            stop_reason=seq.stop_reason,
            num_cached_tokens=seq.num_cached_tokens,
            error=error,
            cumulative_logprob=seq.cumulative_logprob,
        )

    @staticmethod
    def _send(items: list[tuple[Sequence, RequestOutput]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, out in items:
            by_loop.setdefault(seq.sink.loop, []).append((seq.sink.queue, out))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def step(self) -> None:
        batch = self.scheduler.schedule()
        for seq in batch.rejected:
            seq.status = Status.FINISHED
            self._by_id.pop(seq.request_id, None)
            self._send([(seq, self._output(seq, [], "", "error",
                                           error="the prompt is longer than --max-num-batched-tokens"))])
        if not batch:
            if self.scheduler.running or not self.scheduler.waiting:
                return
            # nothing fits even in an empty cache: cannot happen when the pool holds max_model_len
            seq = self.scheduler.waiting[0]
            self._fail([seq], "the KV cache cannot hold this request")
            return
        small = self._small is not None and batch.num_tokens <= SMALL_STEP_TOKENS and not any(
            seq.encoder_input is not None and seq.encoder_state is None for seq, _ in batch.items())
        if self._small is not None:  # (whether a small step runs on one thread or all is measured)
            self._small.before(small)
        try:
            t0 = time.perf_counter()
            result = self.runner.execute(batch, self.stopper.eos_ids)
            if small:
                self._small.record(self._small.current, time.perf_counter() - t0)
        except Exception as exc:
            log.exception("model step failed; failing the %d sequences in it", len(list(batch.items())))
            self._fail([s for s, _ in batch.items()], f"internal error while running the model: {type(exc).__name__}")
            return
        self.scheduler.after_step(batch)
        self.steps += 1
        self.generated_tokens += len(result.tokens)
        self.metrics.tokens(now(), result.seqs)  # one clock reading for the step's sampled sequences
        items = []
        for seq, vector in result.pooled:
            seq.finish_reason = "stop"
            self._finish(seq)
            out = self._output(seq, [], "", "stop")
            out.pooled = vector
            items.append((seq, out))
        for seq, token, entry in zip(result.seqs, result.tokens, result.logprobs):
            if token < 0:
                self._fail([seq], "no token was allowed at this point (the constraint reached a dead end)")
                continue
            items.append((seq, self._append(seq, token, entry)))
        if items:
            self._send(items)

    def _append(self, seq: Sequence, token: int, entry: Any = None) -> RequestOutput:
        params = seq.params
        if params.max_tokens == 0:  # scoring a prompt (completions' echo): its logprobs, no new token
            seq.finish_reason = "length"
            self._finish(seq)
            out = self._output(seq, [], "", "length")
            out.prompt_logprobs, seq.prompt_lp_sent = seq.prompt_lp, True
            return out
        seq.token_ids.append(token)
        if entry is not None:
            seq.cumulative_logprob += entry.logprob
            seq.pending_lp.append(entry)
        finish = self.stopper.after_token(seq, token)
        text = seq.detok.emit(finished=finish is not None) if seq.detok is not None else ""
        new_tokens = seq.token_ids[seq.prompt_len + seq.num_emitted_tokens :]
        seq.num_emitted_tokens = seq.num_output
        result = None
        if finish is not None:
            seq.finish_reason = finish
            result = self._finish(seq, completed=True)
        out = self._output(seq, new_tokens, text, finish)
        out.encoder_result = result
        if params.logprobs is not None:
            out.logprobs, seq.pending_lp = seq.pending_lp, []
        if seq.detok is not None:
            out.text_offsets, seq.pending_offsets = seq.pending_offsets, []
        if seq.prompt_lp is not None and not seq.prompt_lp_sent:
            out.prompt_logprobs, seq.prompt_lp_sent = seq.prompt_lp, True
        return out
