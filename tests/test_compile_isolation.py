"""Structured-output compiles bounded in time and memory: the automaton builds (outlines_core's Index,
lm-format-enforcer's interegular FSMs) run in a worker process under a memory limit and are killed at the
compile time limit; the request gets its 400 within the limit plus a little, and the event loop never waits.

``[ab]*a[ab]{k}`` ("the k-th character from the end is an a") has a deterministic automaton of 2**k states."""

from __future__ import annotations

import os
import time

import pytest

from apikit import api_client, assert_error, health_while
from patchbay.isolation import IsolatedWorker, Shared, WorkerDied, WorkerTimeout, bounded, isolated

COMP = "/v1/completions"
LMFE = "lm-format-enforcer"


def exponential(k: int) -> str:
    return "[ab]*a[ab]{%d}" % k


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _cpu_seconds(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(workers, timeout: float = 5.0) -> None:
    """Neither this process (the in-process server) nor a compile worker still alive burns CPU: the worker
    that ran the runaway compile was killed, and no thread computes on."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [w.pid for w in workers if w.pid is not None]
        before = {pid: _cpu_seconds(pid) for pid in pids}
        own = time.process_time()
        time.sleep(0.5)
        busy = {pid: _cpu_seconds(pid) - t for pid, t in before.items() if _cpu_seconds(pid) - t > 0.05}
        if time.process_time() - own > 0.1:
            busy["server"] = time.process_time() - own
        if not busy:
            return
        assert time.monotonic() < deadline, busy


def test_the_worker_answers_raises_and_is_killed_at_its_deadline():
    worker = IsolatedWorker(256 * 2**20)
    try:
        assert worker.call(sum, [1, 2, 3], timeout=30) == 6
        with pytest.raises(ValueError, match="invalid literal"):
            worker.call(int, "x", timeout=30)
        pid = worker.pid
        start = time.monotonic()
        with pytest.raises(WorkerTimeout):
            worker.call(time.sleep, 30, timeout=0.5)
        assert time.monotonic() - start < 3 and not _alive(pid)  # killed, not left sleeping
        with pytest.raises(MemoryError):  # Python's allocations fail at the limit ...
            worker.call(bytearray, 512 * 2**20, timeout=30)
        with pytest.raises(WorkerDied):  # ... and a process that dies is a WorkerDied
            worker.call(os._exit, 3, timeout=30)
        shared = Shared("k", list(range(1000)))  # crosses the pipe once, then stays in the worker
        first = worker.call(id, shared, timeout=30)
        assert worker.call(id, shared, timeout=30) == first
    finally:
        worker.close()


def test_isolated_runs_inline_outside_a_compile_and_in_the_worker_inside_one():
    assert isolated(os.getpid) == os.getpid()
    worker = IsolatedWorker(None)
    try:
        with bounded(worker, time.monotonic() + 30):
            assert isolated(os.getpid) == worker.pid != os.getpid()
    finally:
        worker.close()


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama, max_model_len=512, structured_outputs_timeout=2.0) as c:
        yield c


CASES = [
    ("outlines", {"guided_regex": exponential(22)}),
    (LMFE, {"guided_regex": exponential(16)}),
    (LMFE, {"guided_json": {"type": "object", "properties": {"s": {"type": "string",
                                                                     "pattern": exponential(16)}}}}),
]


@pytest.mark.parametrize("backend, guide", CASES, ids=["outlines-regex", "lmfe-regex", "lmfe-schema-pattern"])
def test_a_runaway_compile_is_answered_at_the_limit_and_killed(client, backend, guide):
    body = {"prompt": "x", "max_tokens": 2, "guided_decoding_backend": backend, **guide}
    start = time.monotonic()
    assert_error(client.post(COMP, json=body), 400, contains="2 s")
    assert time.monotonic() - start < 2 + 3
    wait_idle(client.model.constraints._workers)
    ok = client.post(COMP, json={"prompt": "x", "max_tokens": 2, "guided_decoding_backend": backend,
                                 "guided_regex": "(yes|no)"})
    assert ok.status_code == 200, ok.text  # a fresh worker serves the next compile


def test_a_compile_does_not_hold_the_event_loop(client):
    """lm-format-enforcer's pattern check builds an automaton while choosing the backend: in the compile
    thread's worker, not on the event loop."""
    body = {"prompt": "x", "max_tokens": 2, "guided_decoding_backend": LMFE,
            "guided_json": {"type": "string", "pattern": exponential(15)}}
    r, latencies = health_while(client, lambda: client.post(COMP, json=body))
    assert_error(r, 400)
    assert len(latencies) >= 5 and max(latencies) < 0.5, latencies


def test_a_compile_past_the_memory_limit_is_a_400_naming_it(tiny_llama):
    with api_client(tiny_llama, max_model_len=512, structured_outputs_timeout=120.0,
                    structured_outputs_memory_bytes=200 * 2**20) as c:
        start = time.monotonic()
        err = assert_error(c.post(COMP, json={"prompt": "x", "max_tokens": 2, "guided_regex": exponential(20)}),
                           400, contains="--structured-outputs-compile-memory")
        assert err["code"] == "constraint_compile_memory" and "200 MiB" in err["message"]
        assert time.monotonic() - start < 120
        ok = c.post(COMP, json={"prompt": "x", "max_tokens": 2, "guided_regex": "(yes|no)"})
        assert ok.status_code == 200, ok.text
