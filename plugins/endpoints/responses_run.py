"""Making one response on the engine, and the responses the app keeps: stored, running in the background,
cancelled.

:class:`ResponseRun` drives one generation and yields the Responses API's events (``response.created``
... ``response.completed``); the non-streamed answer is its last event's response. :class:`ResponsesService`
(one per app, :meth:`patchbay.serving.Serving.state`) holds the store and the background jobs, whose
events are logged so a client can follow them (``GET /v1/responses/{id}?stream=true&starting_after=N``).
Not a plugin itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, AsyncIterator

from patchbay.errors import APIError
from patchbay.served import ServedModel
from patchbay_plugins.endpoints.logprobs import chat_logprobs
from patchbay_plugins.endpoints.responses_output import Event, OutputBuilder
from patchbay_plugins.endpoints.responses_store import open_store
from patchbay_plugins.endpoints.textjob import TextJob
from patchbay_plugins.endpoints.toolstream import TurnReader, reasoning_tokens

log = logging.getLogger("patchbay.responses")

#: finished background jobs whose events are kept for late followers
RECENT_JOBS = 64


class ResponseRun:
    """One response: ``head`` is the response object without output (echoing the request); :meth:`events`
    runs it."""

    def __init__(self, model: ServedModel, job: TextJob, plan: Any, head: dict[str, Any], *, logprobs: int | None):
        self.model, self.job, self.plan = model, job, plan
        self.response = dict(head)
        self.k = logprobs
        self.usage: dict[str, Any] | None = None

    def snapshot(self, **changes: Any) -> dict[str, Any]:
        self.response.update(changes)
        return dict(self.response)

    async def events(self) -> AsyncIterator[Event]:
        """``response.created``, ``response.in_progress``, the output's events, then ``response.completed`` /
        ``response.incomplete`` / ``response.failed`` carrying the whole response."""
        pending: list[Event] = []
        builder = OutputBuilder(pending.append)
        reader = TurnReader(self.model.reasoning_parser, self.plan if self.plan.mode != "none" else None)
        yield {"type": "response.created", "response": self.snapshot(status="in_progress", output=[])}
        yield {"type": "response.in_progress", "response": self.snapshot()}
        req = self.job.req
        ids = self.job.prompts[0]
        offsets: list[int] = []
        last = None
        stream = self.model.generate(f"{self.job.engine_rid}-0", ids, self.job.params(0, 0), priority=req.priority,
                                     cache_salt=req.cache_salt, mm=self.job.mm[0])
        try:
            async for out in stream:
                last = out
                if out.finish_reason == "error":
                    raise APIError(out.error or "internal error", status=500, type="server_error")
                offsets += out.text_offsets or []
                pieces = reader.feed(out.text)
                if out.finished:
                    pieces += reader.finish()
                lps = chat_logprobs(self.job.tt, out.logprobs or [], self.k)["content"] if self.k is not None else None
                builder.add(pieces, lps)
                while pending:
                    yield pending.pop(0)
        except APIError as exc:
            yield {"type": "response.failed", "response": self.snapshot(
                status="failed", error={"code": "server_error", "message": exc.message}, output=builder.finish("incomplete"),
                completed_at=None)}
            return
        finally:
            await stream.aclose()
        cut = last is not None and last.finish_reason == "length"
        output = builder.finish("incomplete" if cut else "completed", {c.id for c in reader.turn.calls})
        while pending:
            yield pending.pop(0)
        prompt = len(ids)
        made = last.num_output_tokens if last is not None else 0
        thought = reasoning_tokens(self.model.reasoning_parser, reader.text, offsets)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": last.num_cached_tokens if last else 0},
                 "output_tokens": made, "output_tokens_details": {"reasoning_tokens": thought},
                 "total_tokens": prompt + made}
        final = self.snapshot(status="incomplete" if cut else "completed", output=output, usage=usage,
                              completed_at=int(time.time()),
                              incomplete_details={"reason": "max_output_tokens"} if cut else None)
        yield {"type": "response.incomplete" if cut else "response.completed", "response": final}


class Job:
    """A response running in the background (or streamed in the background): its task and event log."""

    def __init__(self, run: ResponseRun, input_items: list[dict[str, Any]]):
        self.run = run
        self.input_items = input_items
        self.events: list[Event] = []
        self.changed = asyncio.Condition()
        self.done = False
        #: deleted while running: nothing more is stored
        self.deleted = False
        self.task: asyncio.Task | None = None

    @property
    def rid(self) -> str:
        return self.run.response["id"]

    async def log(self, event: Event) -> None:
        event = {**event, "sequence_number": len(self.events)}
        async with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    async def follow(self, after: int = -1) -> AsyncIterator[Event]:
        """The events after sequence number ``after``, as they come, until the job ends."""
        i = after + 1
        while True:
            async with self.changed:
                while i >= len(self.events) and not self.done:
                    await self.changed.wait()
                batch, finished = self.events[i:], self.done
            for event in batch:
                yield event
            i += len(batch)
            if finished and i >= len(self.events):
                return


class ResponsesService:
    """The app's stored responses and background jobs."""

    def __init__(self, serving: Any):
        config = serving.config
        self.store = open_store(config.responses_store, config.responses_store_max_entries,
                                config.responses_store_max_bytes)
        #: background jobs still running
        self.jobs: dict[str, Job] = {}
        #: finished background jobs, their events kept for late followers
        self.recent: OrderedDict[str, Job] = OrderedDict()
        self.closed = False

    def close(self) -> None:
        """At shutdown: running jobs are cancelled (a SQLite store marks them failed when it is next opened)."""
        self.closed = True
        for job in list(self.jobs.values()):
            if job.task is not None:
                job.task.cancel()
        self.store.close()

    # ------------------------------------------------------------------ reading

    def get(self, rid: str) -> dict[str, Any] | None:
        """The response ``rid`` as it stands (a running one's latest snapshot), or None."""
        job = self.jobs.get(rid)
        if job is not None:
            return job.run.snapshot()
        entry = self.store.get(rid)
        return None if entry is None else entry["response"]

    def conversation(self, rid: str, param: str) -> list[dict[str, Any]]:
        """The input and output items of stored response ``rid``: a continuation's start."""
        if rid in self.jobs:
            raise APIError(f"Response {rid!r} is still running; continue it once it has finished.", status=400,
                           param=param)
        entry = self.store.get(rid)
        if entry is None:
            raise APIError(f"No stored response has the id {rid!r}.", status=404, param=param,
                           code="response_not_found")
        return [*entry["input"], *entry["response"]["output"]]

    def job(self, rid: str) -> Job | None:
        return self.jobs.get(rid) or self.recent.get(rid)

    # ------------------------------------------------------------------ writing

    def save(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        if response.get("store") and not self.closed:
            self.store.put(response["id"], {"response": response, "input": input_items})

    def delete(self, rid: str) -> bool:
        job = self.jobs.get(rid)
        if job is not None and job.task is not None:
            job.deleted = True
            job.task.cancel()
        self.recent.pop(rid, None)
        return self.store.delete(rid) or job is not None

    def start(self, run: ResponseRun, input_items: list[dict[str, Any]]) -> Job:
        """Run ``run`` in the background: stored at once as ``queued``, then as it ends."""
        job = Job(run, input_items)
        self.save(run.snapshot(status="queued", output=[]), input_items)
        self.jobs[job.rid] = job
        job.task = asyncio.ensure_future(self._background(job))
        return job

    async def _background(self, job: Job) -> None:
        final = None
        try:
            async for event in job.run.events():
                await job.log(event)
                if event["type"] == "response.in_progress" and not job.deleted:
                    self.save(event["response"], job.input_items)
                if "response" in event:
                    final = event["response"]
        except asyncio.CancelledError:
            final = job.run.snapshot(status="cancelled")
        except Exception as exc:  # noqa: BLE001 - recorded in the response, never lost
            log.exception("background response %s failed", job.rid)
            final = job.run.snapshot(status="failed", error={"code": "server_error", "message": str(exc)})
        finally:
            if final is not None and not job.deleted:
                self.save(final, job.input_items)
            self.jobs.pop(job.rid, None)
            if not job.deleted:
                self.recent[job.rid] = job
            while len(self.recent) > RECENT_JOBS:
                self.recent.popitem(last=False)
            async with job.changed:
                job.done = True
                job.changed.notify_all()

    def cancel(self, rid: str) -> dict[str, Any] | None:
        """Cancel background response ``rid`` (its engine sequence is aborted and its blocks freed); the
        response as it then stands, or None when there is no such response."""
        job = self.jobs.get(rid)
        if job is None:
            return self.get(rid)
        if job.task is not None:
            job.task.cancel()
        return job.run.snapshot(status="cancelled")
