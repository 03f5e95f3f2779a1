"""The app factory: plugins -> registries -> served model -> Litestar app."""

from __future__ import annotations

import hmac
import logging
from typing import Any, Iterable

import msgspec
from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send

from patchbay.config import ServerConfig
from patchbay.errors import APIError, error_body, status_error
from patchbay.plugins import PluginSet, load_plugins
from patchbay.registry import StartupError
from patchbay.serving import Serving

log = logging.getLogger("patchbay.app")

#: routes reachable without an API key
OPEN_PATHS = frozenset({"/health", "/version"})


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json",
                    headers=headers)


def _api_error(_: Request, exc: APIError) -> Response:
    return _json_response(exc.status, exc.body())


def _http_error(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if status == 404:
        message = f"Not found: {request.method} {request.url.path}"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    elif status == 413:
        message = "The request body is too large."
    else:
        message = exc.detail or status_error(status).message
    return _json_response(status, status_error(status, message).body(), headers=exc.headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _json_response(500, error_body("Internal server error.", "server_error", None, None))


def auth_middleware(keys: tuple[str, ...]):
    """Bearer-token check in constant time, on every path except :data:`OPEN_PATHS`."""
    expected = [k.encode() for k in keys]

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
                await app(scope, receive, send)
                return
            token = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    token = value[7:].strip() if value[:7].lower() == b"bearer " else b"\x00"
                    break
            ok = False
            for key in expected:  # compare with every key: timing does not tell which matched
                ok |= hmac.compare_digest(token, key)
            if ok:
                await app(scope, receive, send)
                return
            body = msgspec.json.encode(
                error_body("Invalid or missing API key. Send it as 'Authorization: Bearer <key>'.",
                           "authentication_error", None, "invalid_api_key")
            )
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})

        return middleware

    return factory


def _check_duplicate_routes(routes: list[tuple[str, Any]]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for plugin, handler in routes:
        if not isinstance(handler, HTTPRouteHandler):
            continue
        for path in handler.paths:
            for method in handler.http_methods:
                key = (path, method)
                if key in seen:
                    raise StartupError(f"{method} {path} is registered twice: by {seen[key]!r} and by {plugin!r}")
                seen[key] = plugin


def create_app(
    config: ServerConfig,
    *,
    plugins: PluginSet | None = None,
    extra_plugins: Iterable[tuple[str, Any]] = (),
    serving: Serving | None = None,
) -> Litestar:
    """Build the app: load plugins, run registration hooks, load the model, assemble routes."""
    if plugins is None:
        plugins = load_plugins(config.plugins, extra=extra_plugins)
    registries = plugins.build_registries()
    _check_duplicate_routes(registries.routes)
    if serving is None:
        serving = Serving.build(config, registries)
    middleware = [auth_middleware(config.api_key)] if config.api_key else []
    app = Litestar(
        route_handlers=[handler for _, handler in registries.routes],
        dependencies={"serving": Provide(lambda: serving, use_cache=True, sync_to_thread=False)},
        on_startup=[serving.start],
        on_shutdown=[serving.stop],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        middleware=middleware,
        request_max_body_size=config.max_request_body_bytes,
        openapi_config=None,
        debug=False,
        logging_config=None,
    )
    app.state.serving = serving
    app.state.plugins = plugins
    return app
