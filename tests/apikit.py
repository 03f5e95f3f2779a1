"""Helpers for in-process endpoint tests (Litestar's test client, no sockets)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from litestar.testing import TestClient

from patchbay.app import create_app
from patchbay.config import ServerConfig


@contextmanager
def api_client(model_dir, **overrides: Any) -> Iterator[TestClient]:
    overrides.setdefault("cpu_threads", 1)
    overrides.setdefault("max_model_len", 256)
    overrides.setdefault("served_model_name", ("tiny",))
    extra = overrides.pop("extra_plugins", ())
    config = ServerConfig(model=str(model_dir), **overrides).validate()
    app = create_app(config, extra_plugins=extra)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.serving = app.state.serving
        #: the one served model
        client.model = app.state.serving.models[0]
        yield client


def assert_error(response, status: int, param: str | None = "__any__", *, contains: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param != "__any__":
        assert err["param"] == param, err
    assert contains in err["message"], err
    return err


def sse_events(text: str) -> list[Any]:
    import json

    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@contextmanager
def multi_client(*models: dict[str, Any], **top: Any) -> Iterator[TestClient]:
    """Several models in one app, as ``--config`` with ``models`` builds them: each dict is one
    model's fields (``model`` and ``served_model_name`` at least) over the top-level ``top``."""
    top.setdefault("cpu_threads", 1)
    top.setdefault("max_model_len", 256)
    configs = tuple(ServerConfig(**{**top, **m, "model": str(m["model"])}).validate() for m in models)
    app = create_app(ServerConfig(**top, models=configs).validate())
    with TestClient(app, raise_server_exceptions=False) as client:
        client.serving = app.state.serving
        yield client
def health_while(client, request) -> tuple[Any, list[float]]:
    """Run ``request()`` (a slow call on ``client``) in a thread and poll ``/health`` until it returns:
    its response and each poll's latency (a held event loop shows as one long poll)."""
    import threading
    import time

    done = threading.Event()
    result = {}

    def run() -> None:
        try:
            result["r"] = request()
        finally:
            done.set()

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.2)  # the slow part has started
    latencies = []
    while not done.is_set():
        start = time.monotonic()
        assert client.get("/health").status_code == 200
        latencies.append(time.monotonic() - start)
    worker.join()
    return result.get("r"), latencies
