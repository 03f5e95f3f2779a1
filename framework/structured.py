"""Choosing a structured-output backend and compiling constraints: off the engine loop,
under a time limit, cached, failing closed.

Each compile runs in a compile thread, answered within the time limit; what a
backend runs through :func:`patchbay.isolation.isolated` (its automaton build)
runs in that thread's worker process, under the memory limit
(``--structured-outputs-compile-memory``) and killed at the time limit.

Endpoints turn a request's ``guided_*`` / ``structured_outputs`` /
``response_format`` into a :class:`~patchbay.decoding.ConstraintSpec` and call
:meth:`ConstraintService.compile`. Backend choice: the request's
(``guided_decoding_backend``), else the server default
(``--structured-outputs-config '{"backend": ...}'`` / ``--guided-decoding-backend``);
``auto`` picks the first registered backend that can honour the spec, trying
them in the order they declare (:attr:`~patchbay.decoding.DecodingBackend.auto_priority`:
lower first, ties by name; a backend whose priority is None is only used when
named). A backend that cannot honour the spec is a 400 naming the backend and
the feature — never unconstrained output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from patchbay.constraint_limits import check_spec
from patchbay.decoding import CompiledConstraint, ConstraintError, ConstraintSpec, DecodingBackend, TokenizerInfo
from patchbay.errors import bad_request
from patchbay.isolation import IsolatedWorker, WorkerDied, WorkerTimeout, bounded

log = logging.getLogger("patchbay.structured")


def auto_priority(backend: DecodingBackend) -> int | None:
    """The backend's :attr:`~patchbay.decoding.DecodingBackend.auto_priority` (None when it has none)."""
    priority = getattr(backend, "auto_priority", None)
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
        raise TypeError(f"decoding backend {backend.name!r}: auto_priority must be an int or None, not {priority!r}")
    return priority


def spec_key(spec: ConstraintSpec) -> str:
    """Canonical text of a spec (dict values are not hashable; key order must not matter)."""
    return json.dumps(
        [spec.kind, spec.value, spec.whitespace_pattern, spec.disable_any_whitespace], sort_keys=True, default=str
    )


class ConstraintService:
    def __init__(
        self,
        backends: dict[str, DecodingBackend],
        tokenizer_info: Any,
        *,
        default_backend: str = "auto",
        timeout: float = 10.0,
        cache_size: int = 256,
        workers: int = 2,
        memory_bytes: int | None = None,
    ):
        self.backends = backends
        for backend in backends.values():
            auto_priority(backend)  # a wrong type fails at start-up, not in a request
        self._tokenizer_info = tokenizer_info  # a callable: built on first use
        self.default_backend = default_backend
        self.timeout = timeout
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, str], CompiledConstraint] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="patchbay-compile")
        #: each compile thread's worker process (address space at most ``memory_bytes``)
        self.memory_bytes = memory_bytes
        self._local = threading.local()
        self._workers: list[IsolatedWorker] = []
        self._workers_lock = threading.Lock()
        self.compiles = 0
        self.hits = 0

    @property
    def tokenizer(self) -> TokenizerInfo:
        return self._tokenizer_info()

    def order(self) -> list[str]:
        """The backends ``auto`` tries, in order: by ``auto_priority``, lower first, ties by name (None: never)."""
        ranked = {name: p for name, b in self.backends.items() if (p := auto_priority(b)) is not None}
        return sorted(ranked, key=lambda name: (ranked[name], name))

    def names(self) -> list[str]:
        """Every backend: those ``auto`` tries, in its order, then those only used by name, by name."""
        auto = self.order()
        return auto + sorted(name for name in self.backends if name not in auto)

    def choose(self, spec: ConstraintSpec, requested: str | None, param: str) -> DecodingBackend:
        """The backend that will compile ``spec``; a 400 naming the backend and feature otherwise."""
        name = requested or self.default_backend
        if not self.backends:
            raise bad_request("Structured outputs need a decoding backend plugin, and none is loaded.", param=param)
        if name == "auto":
            if not self.order():
                raise bad_request("No structured-output backend is chosen by auto (each is used only when named); "
                                  f"name one of: {', '.join(self.names())}.", param=param,
                                  code="unsupported_constraint")
            reasons = []
            for candidate in self.order():
                why = self.backends[candidate].unsupported(spec)
                if why is None:
                    return self.backends[candidate]
                reasons.append(f"{candidate}: {why}")
            raise bad_request("No structured-output backend can honour this constraint (" + "; ".join(reasons) + ").",
                              param=param, code="unsupported_constraint")
        backend = self.backends.get(name)
        if backend is None:
            raise bad_request(f"Unknown structured-output backend {name!r}; available: auto, "
                              f"{', '.join(self.names())}.", param="guided_decoding_backend" if requested else param)
        why = backend.unsupported(spec)
        if why is not None:
            raise bad_request(f"The {name} backend cannot honour this constraint: {why}", param=param,
                              code="unsupported_constraint")
        return backend

    async def compile(self, spec: ConstraintSpec, requested: str | None, param: str) -> CompiledConstraint:
        """The compiled constraint (cached), or a 400 naming the limit or the problem, within the time limit.
        Choosing the backend runs in the compile thread too: a backend's checks may build an automaton."""
        check_spec(spec, param)
        info = self.tokenizer
        key = (requested or self.default_backend, spec_key(spec), info.fingerprint)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.timeout
        future = loop.run_in_executor(self._pool, self._compile, spec, requested, param, info, deadline)
        try:
            compiled = await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            raise self._too_slow(spec, key[0], param) from None
        self.compiles += 1
        self._cache[key] = compiled
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def _too_slow(self, spec: ConstraintSpec, name: str, param: str) -> Exception:
        return bad_request(
            f"Compiling the {spec.kind} constraint with {name} took longer than {self.timeout:g} s "
            "(--structured-outputs-compile-timeout); simplify it.", param=param,
            code="constraint_compile_timeout")

    def _compile(self, spec: ConstraintSpec, requested: str | None, param: str, info: Any,
                 deadline: float) -> CompiledConstraint:
        """In a compile thread: choose the backend and compile, the isolated steps in this thread's worker
        process (see :mod:`patchbay.isolation`)."""
        worker = getattr(self._local, "worker", None)
        if worker is None:
            worker = self._local.worker = IsolatedWorker(self.memory_bytes)
            with self._workers_lock:
                self._workers.append(worker)
        name = requested or self.default_backend
        try:
            with bounded(worker, deadline):
                backend = self.choose(spec, requested, param)
                name = backend.name
                return backend.compile(spec, info)
        except WorkerTimeout:
            raise self._too_slow(spec, name, param) from None
        except ConstraintError as exc:
            raise bad_request(f"Invalid {spec.kind} constraint ({name}): {exc}", param=param,
                              code="invalid_constraint") from None
        except (WorkerDied, MemoryError):
            limit = f"{self.memory_bytes / 2**20:g} MiB" if self.memory_bytes else "the memory available"
            raise bad_request(
                f"Compiling the {spec.kind} constraint with {name} needed more memory than {limit} "
                "(--structured-outputs-compile-memory); simplify it.", param=param,
                code="constraint_compile_memory") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._workers_lock:
            for worker in self._workers:
                worker.close()
