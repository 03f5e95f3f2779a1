"""The app factory: plugins -> registries -> served models -> Litestar app.

Routes come from the ``register_routes`` hook. A route that must stay open
without an API key says so itself: ``@get("/health", opt={"auth": False})``
(only paths without parameters can be open). The key is checked before
routing, so an unknown path or a wrong method without a key is a 401 too.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Iterable

import msgspec
from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Receive, Scope, Send

from patchbay.config import ServerConfig
from patchbay.loader import with_default_model
from patchbay.errors import APIError, error_body, status_error
from patchbay.plugins import PluginSet, load_plugins
from patchbay.registry import StartupError
from patchbay.serving import Serving

log = logging.getLogger("patchbay.app")

def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json",
                    headers=headers)


def _api_error(_: Request, exc: APIError) -> Response:
    return _json_response(exc.status, exc.body(), headers=exc.headers)


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
    param = None
    extra = getattr(exc, "extra", None)
    if status == 400 and isinstance(extra, list) and extra and isinstance(extra[0], dict) and extra[0].get("key"):
        # a query or path parameter the route's signature refused: name it (bodies are checked by protocol.py)
        param = str(extra[0]["key"])
        message = f"Invalid value for '{param}': {extra[0].get('message') or 'not accepted'}."
    return _json_response(status, status_error(status, message, param=param).body(), headers=exc.headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _json_response(500, error_body("Internal server error.", "server_error", None, None))


#: the media types a route with a JSON body accepts (``opt={"content_types": (...)}`` says otherwise)
JSON_TYPES = ("application/json",)


async def check_content_type(request: Request) -> None:
    """A route that declares a body (``opt={"body": ...}``) takes only its media types: a 415 otherwise.
    A body sent with no Content-Type at all is read as the route's first type (as curl users expect)."""
    opt = request.route_handler.opt
    if opt.get("body") is None or request.method != "POST":
        return
    accepted = opt.get("content_types", JSON_TYPES)
    given = request.headers.get("content-type")
    if given is None:
        return
    media = given.split(";", 1)[0].strip().lower()
    if media in accepted or (media.endswith("+json") and "application/json" in accepted):
        return
    raise APIError(f"Unsupported Content-Type {media or given!r}; this route takes {' or '.join(accepted)}.",
                   status=415, code="unsupported_media_type")


def route_body_limits(app: Litestar, config: ServerConfig) -> None:
    """A route that takes uploads with a limit of their own (``opt={"max_body": f}``, ``f(config)`` in bytes)
    accepts bodies up to that limit where it is above ``--max-request-body-size`` (the audio routes:
    ``--max-audio-filesize-mb`` and the form around the file). Litestar copied each handler at registration
    and resolves its limit at the first request, so this runs before the app serves."""
    for route in app.routes:
        for handler in route.route_handlers if isinstance(route, HTTPRoute) else ():
            limit = handler.opt.get("max_body")
            if limit is not None:
                handler.request_max_body_size = max(config.max_request_body_bytes, int(limit(config)))


def open_paths(app: Litestar) -> frozenset[str]:
    """Paths every handler of which says ``opt={"auth": False}`` (and that have no path parameters);
    Litestar's own OPTIONS handlers do not count."""
    out = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path_parameters:
            continue
        handlers = [h for h in route.route_handlers if h.http_methods != {"OPTIONS"}]
        if handlers and all(h.opt.get("auth", True) is False for h in handlers):
            out.add(route.path)
    return frozenset(out)


def require_api_key(app: ASGIApp, keys: tuple[str, ...], open_: frozenset[str]) -> ASGIApp:
    """Bearer-token check in constant time, before routing, on HTTP and websocket scopes alike, except
    for the exact paths in ``open_``."""
    expected = [k.encode() for k in keys]

    async def check(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or (scope["type"] == "http" and scope["path"] in open_):
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
        if scope["type"] == "websocket":  # refuse the handshake (the server answers 403)
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        body = msgspec.json.encode(
            error_body("Invalid or missing API key. Send it as 'Authorization: Bearer <key>'.",
                       "authentication_error", None, "invalid_api_key")
        )
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    return check


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
    config = with_default_model(config, plugins)
    registries = plugins.build_registries()
    _check_duplicate_routes(registries.routes)
    if serving is None:
        serving = Serving.build(config, registries)
    app = Litestar(
        route_handlers=[handler for _, handler in registries.routes],
        dependencies={"serving": Provide(lambda: serving, use_cache=True, sync_to_thread=False)},
        on_startup=[serving.start],
        on_shutdown=[serving.stop],
        before_request=check_content_type,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        request_max_body_size=config.max_request_body_bytes,
        openapi_config=None,
        debug=False,
        logging_config=None,
    )
    route_body_limits(app, config)
    if config.api_key:
        app.asgi_handler = require_api_key(app.asgi_handler, config.api_key, open_paths(app))
    app.state.serving = serving
    app.state.plugins = plugins
    return app
