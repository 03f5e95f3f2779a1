"""Streaming plumbing for endpoints: merging engine streams, disconnect handling, SSE framing.

Not a plugin itself; any endpoint plugin may import it.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import msgspec
from litestar import Request

from patchbay.engine.params import RequestOutput
from patchbay.errors import APIError

T = TypeVar("T")


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
    """An engine-side failure of a request becomes a 500 for its client."""
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


async def error_in_stream(gen: AsyncIterator[bytes], on_error: Callable[[APIError], bytes] | None = None) -> AsyncIterator[bytes]:
    """Pass SSE bytes through; an error mid-stream becomes ``data: {"error": ...}`` then ``[DONE]``."""
    try:
        async for chunk in gen:
            yield chunk
    except APIError as exc:
        yield on_error(exc) if on_error is not None else sse(exc.body())
        yield SSE_DONE
