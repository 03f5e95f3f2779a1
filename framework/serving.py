"""What endpoint plugins work with: the served models and the server-wide request plumbing.

Every route gets it as the ``serving`` dependency. A handler resolves the
request's ``model`` to a :class:`~patchbay.served.ServedModel` and works with
that.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from litestar.di import NamedDependency

from patchbay.config import ConfigError, ServerConfig
from patchbay.errors import APIError, bad_request
from patchbay.registry import Registries
from patchbay.served import ServedModel, build_engine

log = logging.getLogger("patchbay.serving")
T = TypeVar("T")


class Serving:
    def __init__(self, config: ServerConfig, registries: Registries, models: list[ServedModel]):
        self.config = config
        self.registries = registries
        self.models = models
        self._by_name = {name: m for m in models for name in m.names}
        #: state plugins keep for the app's lifetime (see :meth:`state`)
        self._states: dict[str, Any] = {}

    @classmethod
    def build(cls, config: ServerConfig, registries: Registries) -> "Serving":
        """Load every model (``config.model_configs()``), then budget their KV caches across them
        (:mod:`patchbay.budget`) and give each its own engine.

        All of it runs in a thread of its own that ends with it: OpenMP (GNU libgomp, torch's CPU
        threading) keeps a pool of worker threads for every thread that ran a parallel region, and once it
        manages more threads than there are cores it stops spinning between regions, so every parallel
        region of a step waits for sleeping workers to wake. A load on the calling thread left that
        thread's pool behind next to the engine thread's: a decode step's packed linear layers ran 2-3x
        slower in the engine thread (measured: 8 rows x 512 -> 1536, 2 threads, 230-330 us against
        100-120 us). A thread's pool ends with the thread."""
        return run_in_fresh_thread(cls._build, config, registries)

    @classmethod
    def _build(cls, config: ServerConfig, registries: Registries) -> "Serving":
        import torch

        from patchbay.budget import kv_budgets, report
        from patchbay.loader import load_model

        torch.manual_seed(config.seed)  # unseeded sampling is reproducible per server start
        configs = config.model_configs()
        loaded = []
        for i, cfg in enumerate(configs):
            with model_named(configs, i):
                loaded.append(load_model(cfg, registries))
        budgets = kv_budgets(list(zip(configs, loaded)))
        models: list[ServedModel] = []
        try:
            for i, (cfg, one, budget) in enumerate(zip(configs, loaded, budgets)):
                with model_named(configs, i):
                    nbytes = None if budget is None else budget.nbytes
                    engine = build_engine(cfg, one, nbytes)
                    models.append(ServedModel(cfg, registries, one, engine, cfg.served_names()))
        except BaseException:
            for model in models:
                model.stop()
            raise
        report([(m.names[0], one, budget, m.engine.scheduler.blocks.num_blocks)
                for m, one, budget in zip(models, loaded, budgets)], [c.block_size for c in configs])
        return cls(config, registries, models)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for model in self.models:
            model.start()

    def stop(self) -> None:
        for state in reversed(list(self._states.values())):
            close = getattr(state, "close", None)
            if callable(close):
                close()
        self._states.clear()
        for model in self.models:
            model.stop()

    # ------------------------------------------------------------------ for endpoints

    @property
    def model_names(self) -> list[str]:
        """Every name the API accepts, the models' first names first."""
        return [name for m in self.models for name in m.names]

    def resolve(self, name: str | None) -> tuple[ServedModel, str]:
        """The model a request names and the name to echo; a 404 naming it when no model has that
        name. A request naming none gets the only model (its first name), or a 400 listing the names
        when there are several."""
        if name is None:
            if len(self.models) > 1:
                raise bad_request(
                    f"This server serves several models; name one in `model`: {', '.join(self.model_names)}.",
                    param="model", code="model_required")
            model = self.models[0]
            return model, model.names[0]
        model = self._by_name.get(name)
        if model is None:
            raise APIError(
                f"The model `{name}` does not exist. This server serves: {', '.join(self.model_names)}.",
                status=404,
                param="model",
                code="model_not_found",
            )
        return model, name

    def state(self, key: str, factory: Callable[["Serving"], T]) -> T:
        """The state the plugin calling itself ``key`` keeps for this app (a store, background jobs), made by
        ``factory(serving)`` on first use; its ``close()``, if it has one, runs when the app stops."""
        if key not in self._states:
            self._states[key] = factory(self)
        return self._states[key]

    def request_ids(self, request: Any, body_request_id: str | None, prefix: str) -> tuple[str, str, dict[str, str]]:
        """``(response id, engine id prefix, response headers)`` for one API request.

        The base id is the ``X-Request-Id`` header, else the body's ``request_id``, else
        random; ``--enable-request-id-headers`` echoes it back. Engine ids get a random
        suffix so two clients reusing an id never collide.
        """
        base = request.headers.get("x-request-id") or body_request_id or uuid.uuid4().hex
        response_id = f"{prefix}-{base}"
        headers = {"X-Request-Id": base} if self.config.enable_request_id_headers else {}
        return response_id, f"{response_id}-{uuid.uuid4().hex[:8]}", headers

    def log_request(self, request_id: str, num_prompt_tokens: int, params: Any) -> None:
        """Log a request's parameters (with --enable-log-requests)."""
        if self.config.enable_log_requests:
            log.info("request %s: %d prompt tokens, %s", request_id, num_prompt_tokens, params)


@contextmanager
def model_named(configs: tuple[ServerConfig, ...], index: int) -> Iterator[None]:
    """With several models, a :class:`ConfigError` inside names the model it is about."""
    try:
        yield
    except ConfigError as exc:
        if len(configs) == 1:
            raise
        cfg = configs[index]
        raise ConfigError(f"models[{index}] ({cfg.served_names()[0]}, {cfg.model}): {exc.flag}",
                          exc.message) from None


#: How a route handler asks for the served models: ``async def handler(serving: ServingDep)``.
ServingDep = NamedDependency[Serving]


def run_in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a new thread that has ended when this returns (or re-raises ``fn``'s exception);
    see :meth:`Serving.build`."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="patchbay-load") as pool:  # leaving it joins the thread
        return pool.submit(fn, *args).result()
