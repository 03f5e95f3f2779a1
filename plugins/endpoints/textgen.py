"""Shared by the completions and chat endpoints: sampling fields, validation, streams, SSE.

Not a plugin itself (it has no entry point); third-party text endpoints may
import it too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import attrs
import msgspec
from litestar import Request

from patchbay.engine.params import RequestOutput, SamplingParams
from patchbay.errors import APIError, bad_request

T = TypeVar("T")

#: Documented request fields this server does not implement yet, with their
#: neutral values. A request that sets one to anything else gets a 400 naming it.
NOT_YET_COMMON: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "logprobs": (None, False),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "early_stopping": (None, False),
    "min_tokens": (None, 0),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "prompt_logprobs": (None,),
    "return_tokens_as_token_ids": (None, False),
    "add_special_tokens": (None,),
    "request_id": (None,),
    "priority": (None, 0),
    "cache_salt": (None,),
    "vllm_xargs": (None,),
    "logits_processors": (None, []),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,),
    "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"),
    "kv_transfer_params": (None,),
}

NOT_YET_CHAT: dict[str, tuple[Any, ...]] = {
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True),
    "functions": (None, []),
    "function_call": (None, "none"),
    "reasoning_effort": (None,),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "documents": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "continue_final_message": (None, False),
    "mm_processor_kwargs": (None,),
}


def with_pending_fields(cls: type, *tables: dict[str, tuple[Any, ...]]) -> type:
    """``cls`` plus an optional untyped field for each not-yet-implemented parameter."""
    fields = {name: attrs.field(default=None, kw_only=True) for table in tables for name in table}
    sub = attrs.make_class(cls.__name__, fields, bases=(cls,))
    sub.__module__ = cls.__module__
    sub.pending_fields = {k: v for table in tables for k, v in table.items()}
    return sub


#: OpenAI says these have no effect on the output; accepted and ignored.
IGNORED = ("user", "metadata", "store")


def check_not_yet(request: Any) -> None:
    for name, neutral in getattr(request, "pending_fields", {}).items():
        value = getattr(request, name)
        if any(value == n and type(value) is type(n) for n in neutral):
            continue
        raise bad_request(f"'{name}' is not supported by this server yet.", param=name, code="unsupported_parameter")


@attrs.define(kw_only=True)
class StreamOptions:
    include_usage: bool = False
    continuous_usage_stats: bool = False


@attrs.define(kw_only=True)
class SamplingFields:
    """Request fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None

    def validate_sampling(self) -> None:
        if self.n < 1:
            raise bad_request(f"n must be at least 1 (got {self.n}).", param="n")
        if self.n > 128:
            raise bad_request(f"n must be at most 128 (got {self.n}).", param="n")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1 (got {self.max_tokens}).", param="max_tokens")
        if self.temperature is not None and self.temperature < 0:
            raise bad_request(f"temperature must be at least 0 (got {self.temperature}).", param="temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad_request(f"top_p must be in (0, 1] (got {self.top_p}).", param="top_p")
        if self.top_k is not None and self.top_k < -1:
            raise bad_request(f"top_k must be -1 (off), 0 (off) or positive (got {self.top_k}).", param="top_k")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise bad_request(f"min_p must be in [0, 1] (got {self.min_p}).", param="min_p")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise bad_request("seed is out of range.", param="seed")
        for s in self.stop_list():
            if not s:
                raise bad_request("stop strings must not be empty.", param="stop")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
        check_not_yet(self)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_params(self, max_tokens: int, vocab_size: int) -> SamplingParams:
        for t in self.stop_token_ids or ():
            if not 0 <= t < vocab_size:
                raise bad_request(f"stop_token_ids: {t} is not a token id of this model.", param="stop_token_ids")
        top_k = self.top_k or 0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if top_k < 0 else top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=self.stop_list(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of choice ``index`` of ``n``: seeded choices differ by seed + index."""
    if params.seed is None or index == 0:
        return params
    return attrs.evolve(params, seed=params.seed + index)


# --------------------------------------------------------------------------- running


async def merge_streams(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several output streams as they produce, tagged with their index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def raise_engine_error(out: RequestOutput) -> None:
    if out.finish_reason == "error":
        raise APIError(out.error or "internal error", status=500, type="server_error")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (so the engine aborts)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001
        pass
    raise APIError("The client disconnected.", status=499, type="invalid_request_error")


# --------------------------------------------------------------------------- SSE


def sse(data: Any) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


async def error_in_stream(gen: AsyncIterator[bytes], on_error: Callable[[APIError], bytes]) -> AsyncIterator[bytes]:
    """Pass SSE bytes through; an error mid-stream becomes ``data: {"error": ...}`` then ``[DONE]``."""
    try:
        async for chunk in gen:
            yield chunk
    except APIError as exc:
        yield on_error(exc)
        yield SSE_DONE
