"""A real ``serve`` process under overload: hundreds of concurrent requests against --max-num-seqs 4 and a
small --max-waiting-seqs, hundreds of abandoned streams, then SIGTERM with streams in flight. Each phase
ends with the gauges back at idle and the server healthy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time

import httpx
import pytest

from serverkit import serve

pytestmark = pytest.mark.e2e
KEY = "sk-overload"
H = {"Authorization": f"Bearer {KEY}"}


def wait_idle(server) -> dict:
    return server.wait_idle(KEY)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = [str(tiny_llama), "--served-model-name", "tiny", "--max-model-len", "256", "--api-key", KEY,
            "--max-num-seqs", "4", "--max-waiting-seqs", "8"]
    with serve(args, tmp_path_factory.mktemp("overload")) as s:
        yield s


def test_hundreds_of_concurrent_requests_overflow_the_bounded_queue(server):
    """300 requests at once, each 200 tokens long: 4 run, 8 wait, and every other arrival finds the queue
    full (the first 12 alone need hundreds of engine steps, far longer than 300 requests take to arrive): a
    429 with Retry-After at once, while a monitor thread's samples of the waiting gauge never pass 8.
    Before admissions were counted, every request passed the check before any had reached the engine,
    and all 300 waited (the gauge showed 296 waiting)."""
    samples: list[float] = []
    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                samples.append(server.metrics(KEY)["num_requests_waiting"])
            time.sleep(0.02)

    async def one(http, i):
        start = time.monotonic()
        r = await http.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 200, "ignore_eos": True})
        return r, time.monotonic() - start

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=H, timeout=120,
                                     limits=httpx.Limits(max_connections=300)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(300)))

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        watcher.join(30)
    statuses = [r.status_code for r, _ in results]
    assert set(statuses) <= {200, 429}, set(statuses)
    assert statuses.count(200) >= 8, statuses.count(200)  # the first arrivals find an empty queue
    assert statuses.count(429) >= 100, statuses.count(429)
    for r, seconds in results:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_overloaded"
            assert seconds < 30, seconds  # answered at once (a loaded machine is slow to get through 300)
        else:
            assert r.json()["usage"]["completion_tokens"] == 200
    assert samples and max(samples) <= 8, (len(samples), max(samples, default=None))
    m = wait_idle(server)
    assert m["request_success_total{finished_reason=length}"] >= statuses.count(200)
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.fixture(scope="module")
def roomy_server(tiny_llama, tmp_path_factory):
    """--max-num-seqs 4 and the default waiting bound (1024): hundreds of streams are all admitted."""
    args = [str(tiny_llama), "--served-model-name", "tiny", "--max-model-len", "256", "--api-key", KEY,
            "--max-num-seqs", "4"]
    with serve(args, tmp_path_factory.mktemp("roomy")) as s:
        yield s


def test_hundreds_of_abandoned_streams_free_everything(roomy_server):
    """200 streams of 200 tokens, each dropped after its first chunk: every one is aborted long before its
    end, and the gauges (KV cache included) are back at idle."""
    server = roomy_server
    before = server.metrics(KEY)

    async def abandon(http, i):
        body = {"prompt": f"s{i}", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                return line  # leaving the block closes the connection mid-stream

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=H, timeout=120,
                                     limits=httpx.Limits(max_connections=300)) as http:
            return await asyncio.gather(*(abandon(http, i) for i in range(200)))

    firsts = asyncio.run(main())
    assert all(line.startswith("data: {") for line in firsts), firsts[:3]
    m = wait_idle(server)

    def delta(name):
        return m.get(name, 0) - before.get(name, 0)

    aborted, ran_out = delta("request_success_total{finished_reason=abort}"), delta(
        "request_success_total{finished_reason=length}")
    assert aborted + ran_out == 200, (aborted, ran_out)  # every stream ended, nothing is left running
    # most are aborted (a stream may reach its end before the server notices the client left)
    assert aborted >= 150 and delta("generation_tokens_total") < 200 * 200 / 2, (aborted, ran_out)
    r = httpx.post(server.url + "/v1/completions", headers=H, json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_sigterm_with_streams_in_flight_drains(tiny_llama, tmp_path):
    """SIGTERM while 4 streams are generating and 4 wait: every stream still runs to its last token and
    ends with [DONE], and the server exits cleanly."""
    import json

    args = [str(tiny_llama), "--max-model-len", "512", "--max-num-seqs", "4"]
    with serve(args, tmp_path) as server:
        started = 0

        async def stream(http, i):
            nonlocal started
            body = {"prompt": f"t{i}", "max_tokens": 300, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            lines = []
            async with http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line:
                        started += not lines
                        lines.append(line)
            return r.status_code, lines

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                tasks = [asyncio.ensure_future(stream(http, i)) for i in range(8)]
                while started < 4:  # the first four are generating, the others wait
                    await asyncio.sleep(0.01)
                os.killpg(server.proc.pid, signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(main())
        assert server.proc.wait(120) == 0
        for result in results:
            assert not isinstance(result, BaseException), results
            status, lines = result
            assert status == 200 and lines[-1] == "data: [DONE]", lines[-3:]
            usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
            assert usage["completion_tokens"] == 300, usage
        assert "Traceback" not in server.output()


def test_a_full_queue_is_a_429_at_once_for_every_kind_of_request(tiny_llama):
    """Fill the waiting queue behind one running sequence, then ask: completions (plain and streamed) and
    chat answer 429 with Retry-After at once; after the queue drains, they are served."""
    from apikit import api_client, assert_error
    from patchbay.engine.params import SamplingParams

    with api_client(tiny_llama, max_num_seqs=1, max_waiting_seqs=2) as c:
        engine = c.model.engine

        async def hold():
            gens = [engine.generate(f"hold{i}", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
                    for i in range(3)]
            return gens, [asyncio.ensure_future(g.__anext__()) for g in gens]

        loop = asyncio.new_event_loop()
        gens, tasks = loop.run_until_complete(hold())
        deadline = time.monotonic() + 10
        while engine.num_waiting() < 2 and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.01))
        for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                           ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            start = time.monotonic()
            r = c.post(path, json=body)
            assert time.monotonic() - start < 2
            assert_error(r, 429, None)
            assert r.headers["retry-after"] == "1"
        for t in tasks:
            t.cancel()
        for g in gens:
            loop.run_until_complete(g.aclose())
        loop.close()
        deadline = time.monotonic() + 30
        while engine.num_waiting() or engine.scheduler.running:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_requests_admitted_at_the_same_moment_are_all_counted(tiny_llama):
    """The check and the reservation are one step: 50 requests that each pass the check and then await
    something (as every endpoint does before its sequences reach the engine) cannot all get in. A place
    turns into a submitted sequence, and what a request leaves unused comes back."""
    from enginekit import build_serving
    from patchbay.engine.engine import QueueFullError
    from patchbay.engine.params import SamplingParams

    model = build_serving(tiny_llama, max_num_seqs=1, max_waiting_seqs=4)
    engine = model.engine  # not started: nothing leaves the queue

    async def main():
        pending = []

        async def request(i):
            try:
                model.admit(1)
            except QueueFullError:
                return False
            await asyncio.sleep(0.01)
            gen = engine.generate(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=1))
            pending.append((gen, asyncio.ensure_future(gen.__anext__())))
            await asyncio.sleep(0)
            return True

        async def held_then_released():
            admission = model.admit(3)  # one request of three sequences, admitted whole
            assert engine._reserved == 3
            admission.release()
            assert engine._reserved == 0

        async def dropped():
            model.admit(2)  # never submitted: given back when the request's context is gone

        await asyncio.ensure_future(held_then_released())
        await asyncio.ensure_future(dropped())
        await asyncio.sleep(0)
        assert engine._reserved == 0
        admitted = await asyncio.gather(*(request(i) for i in range(50)))
        assert sum(admitted) == 4 and engine.num_waiting() == 4 and engine._reserved == 0
        for gen, task in pending:
            task.cancel()
        await asyncio.sleep(0)
        for gen, _ in pending:
            await gen.aclose()

    asyncio.run(main())
