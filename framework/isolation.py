"""Work a thread cannot bound, run in a worker process that can be: a memory limit (``RLIMIT_AS``, set by the
worker on itself before it imports anything) and a deadline (past it, the process is killed, so nothing keeps
burning CPU after the caller has given up).

The kernel uses it for structured-output compiles (:mod:`patchbay.structured`): each compile thread owns one
:class:`IsolatedWorker`, and while a backend compiles in that thread, :func:`isolated` runs a function in the
thread's worker within what is left of the compile's time limit. A backend calls :func:`isolated` for its
expensive, uninterruptible step (building an automaton) with a module-level function and picklable arguments;
called anywhere else (a backend used directly), :func:`isolated` just calls the function.

The worker is ``python -m patchbay.isolation`` (a fresh interpreter: no fork of the server's threads), fed
``(function, args)`` pickles over a pipe; an argument wrapped in :class:`Shared` (a tokenizer's vocabulary)
crosses the pipe once per worker and is kept there.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterator


class WorkerTimeout(TimeoutError):
    """The call did not finish within its time; the worker was killed."""


class WorkerDied(RuntimeError):
    """The worker exited during the call: it ran out of its memory limit (a native allocation failure aborts
    the process) or crashed."""


class Shared:
    """An argument sent to each worker once and kept there under ``key`` (later calls send only the key)."""

    __slots__ = ("key", "value")

    def __init__(self, key: Any, value: Any):
        self.key = key
        self.value = value


class _Held:
    __slots__ = ("key",)

    def __init__(self, key: Any):
        self.key = key


class IsolatedWorker:
    """One worker process, started on first use and again after it was killed or died. One call at a time."""

    def __init__(self, memory_bytes: int | None):
        self.memory_bytes = memory_bytes
        self._proc: subprocess.Popen | None = None
        self._to: Connection | None = None
        self._from: Connection | None = None
        self._held: set[Any] = set()

    @property
    def pid(self) -> int | None:
        """The live worker's pid (None when there is none); read from any thread while a compile thread may
        kill and drop the process, so the process is read once."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _start(self) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "RAYON_NUM_THREADS": "1"}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "patchbay.isolation", str(to_r), str(from_w), str(self.memory_bytes or 0)],
                pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(to_r)
            os.close(from_w)
        self._to = Connection(to_w, readable=False)
        self._from = Connection(from_r, writable=False)
        self._held = set()

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """``fn(*args)`` in the worker: its result, or the exception it raised (re-raised here);
        :class:`WorkerTimeout` after ``timeout`` seconds, :class:`WorkerDied` if the worker exits."""
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        assert self._to is not None and self._from is not None
        wire = [_Held(a.key) if isinstance(a, Shared) and a.key in self._held else a for a in args]
        deadline = time.monotonic() + timeout
        try:
            self._to.send_bytes(pickle.dumps((fn, wire), protocol=pickle.HIGHEST_PROTOCOL))
            self._held.update(a.key for a in args if isinstance(a, Shared))
            ready = self._from.poll(max(0.0, deadline - time.monotonic()))
            answer = pickle.loads(self._from.recv_bytes()) if ready else None
        except (EOFError, OSError):
            code = self.close()
            raise WorkerDied(f"the worker process exited (status {code})") from None
        if answer is None:
            self.close()
            raise WorkerTimeout(f"no answer within {timeout:g} s")
        status, value = answer
        if status == "ok":
            return value
        raise value

    def close(self) -> int | None:
        """Kill the worker (if running); its exit status."""
        for conn in (self._to, self._from):
            if conn is not None:
                conn.close()
        self._to = self._from = None
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return proc.wait()


_local = threading.local()


@contextmanager
def bounded(worker: IsolatedWorker, deadline: float) -> Iterator[None]:
    """While in this block, :func:`isolated` on this thread runs in ``worker``, until ``deadline`` (monotonic)."""
    previous = getattr(_local, "current", None)
    _local.current = (worker, deadline)
    try:
        yield
    finally:
        _local.current = previous


def isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the current :func:`bounded` block's worker (within its deadline), else right here."""
    current = getattr(_local, "current", None)
    if current is None:
        return fn(*(a.value if isinstance(a, Shared) else a for a in args))
    worker, deadline = current
    return worker.call(fn, *args, timeout=max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------- the worker's side


def _answer(fn: Any, args: list[Any], held: dict[Any, Any]) -> tuple[str, Any]:
    values = []
    for a in args:
        if isinstance(a, Shared):
            held[a.key] = a.value
            values.append(a.value)
        elif isinstance(a, _Held):
            values.append(held[a.key])
        else:
            values.append(a)
    return "ok", fn(*values)


def _serve(inbox: Connection, outbox: Connection) -> None:
    held: dict[Any, Any] = {}
    while True:
        try:
            data = inbox.recv_bytes()
        except (EOFError, OSError):
            return  # the server went away
        try:
            fn, args = pickle.loads(data)
            del data
            answer = _answer(fn, args, held)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            answer = ("error", exc)
        try:
            payload = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # noqa: BLE001 - an unpicklable result or exception, or no memory left
            answer = None
            payload = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        outbox.send_bytes(payload)


def main(argv: list[str]) -> None:
    inbox_fd, outbox_fd, memory = (int(a) for a in argv)
    if memory:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    _serve(Connection(inbox_fd, writable=False), Connection(outbox_fd, readable=False))


if __name__ == "__main__":  # the module's own classes, not __main__'s copies, are the ones pickles name
    from patchbay.isolation import main as _main

    _main(sys.argv[1:])
