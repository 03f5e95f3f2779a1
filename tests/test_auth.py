"""API keys on every route: checked before routing, whatever the method or spelling of the path, for HTTP and
websocket alike; only the routes that declare ``opt={"auth": False}`` (/health, /version, the docs) stay open.
Wrong keys, prefixes and extensions of a right one, other schemes and a missing scheme are all 401s."""

from __future__ import annotations

import hmac
import re
from urllib.parse import unquote

import pytest
from litestar import WebSocket, websocket
from litestar.routes import HTTPRoute, WebSocketRoute

from apikit import api_client, assert_error
from patchbay import hookimpl

KEYS = ("sk-right-key-0123456789", "sk-second-key")
OPEN = {"/health", "/version", "/openapi.json", "/docs", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"}
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
BAD_AUTH = [
    None,
    "Bearer sk-wrong",
    f"Bearer {KEYS[0][:-1]}",  # a prefix
    f"Bearer {KEYS[0][:3]}",
    "Bearer ",
    f"Bearer {KEYS[0]}x",  # an extension
    f"Bearer {KEYS[0]}{KEYS[1]}",
    f"Basic {KEYS[0]}",  # another scheme
    f"Token {KEYS[0]}",
    KEYS[0],  # no scheme
    f"Bearer{KEYS[0]}",
    f"Bearer {KEYS[0].upper()}",
]


class WebsocketPlugin:
    @hookimpl
    def register_routes(self, register):
        @websocket("/v1/realtime-test")
        async def echo(socket: WebSocket) -> None:
            await socket.accept()
            await socket.send_text("hello")
            await socket.close()

        register(echo)


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama, api_key=KEYS, extra_plugins=[("ws-test", WebsocketPlugin())]) as c:
        yield c


def concrete(path_format: str) -> str:
    """A path of the route: ``{model}`` is the served model, any other parameter a plausible id."""
    return re.sub(r"{(\w+)(:[^}]*)?}", lambda m: "tiny" if m[1] == "model" else "resp_0123", path_format)


def routes(client, kind: type = HTTPRoute) -> list[str]:
    return sorted({concrete(route.path_format) for route in client.app.routes if isinstance(route, kind)})


def spellings(path: str) -> list[str]:
    return [path, path + "/", "/" + path, path.replace("/", "//"), path[:-1] + f"%{ord(path[-1]):02X}",
            path.upper()]


def accepted_without_a_valid_key(client, paths: list[str] | None = None) -> list[str]:
    """Every (method, path, header) that was not refused with a 401 envelope."""
    bad = []
    for path in paths or routes(client):
        for method in METHODS:
            for spelled in spellings(path) if method in ("GET", "POST") else [path]:
                if unquote(spelled) in OPEN:
                    continue
                for auth in BAD_AUTH if spelled == path and method in ("GET", "POST") else (None, "Bearer x"):
                    headers = {"Authorization": auth} if auth is not None else {}
                    r = client.request(method, spelled, headers=headers, content=b"{}")
                    if r.status_code != 401 or (method != "HEAD" and r.json()["error"]["code"] != "invalid_api_key"):
                        bad.append(f"{method} {spelled} [{auth}] -> {r.status_code}")
    return bad


def test_every_route_needs_the_key_whatever_the_method_path_or_header(client):
    assert len(routes(client)) >= 20
    assert {"/v1/responses/resp_0123/cancel", "/v1/models/tiny", "/v1/audio/transcriptions"} <= set(routes(client))
    assert accepted_without_a_valid_key(client) == []


def test_the_check_notices_a_prefix_accepting_comparison(client, monkeypatch):
    """The test above fails when the comparison accepts a prefix of the key (the bug it guards against)."""
    monkeypatch.setattr(hmac, "compare_digest", lambda token, key: bool(token) and key.startswith(token))
    assert any("sk-right-key-012345678]" in line for line in accepted_without_a_valid_key(client, ["/v1/models"]))


def test_a_401_is_an_envelope_with_a_challenge(client):
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert_error(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", KEYS)
def test_either_key_opens_every_route(client, key):
    headers = {"Authorization": f"Bearer {key}"}
    for path in routes(client):
        for method in ("GET", "POST"):
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code != 401, (method, path, r.text)
    r = client.get("/v1/models", headers={"Authorization": f"bearer  {key} "})  # scheme is case-insensitive
    assert r.status_code == 200


def test_open_routes_stay_open(client):
    for path in ("/health", "/version", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path


def test_websocket_handshake_needs_the_key(client):
    """Every websocket route (the builtin /v1/realtime and a plugin's), however its path is spelled."""
    from litestar.exceptions import WebSocketDisconnect

    paths = routes(client, WebSocketRoute)
    assert paths == ["/v1/realtime", "/v1/realtime-test"]
    for path in paths:
        for spelled in spellings(path):
            for auth in BAD_AUTH if spelled == path else (None,):
                headers = {"Authorization": auth} if auth is not None else {}
                with pytest.raises(WebSocketDisconnect):
                    with client.websocket_connect(spelled, headers=headers) as ws:
                        ws.receive_text()
    with client.websocket_connect("/v1/realtime-test", headers={"Authorization": f"Bearer {KEYS[1]}"}) as ws:
        assert ws.receive_text() == "hello"
    with client.websocket_connect("/v1/realtime?model=tiny", headers={"Authorization": f"Bearer {KEYS[0]}"}) as ws:
        assert ws.receive_json()["type"] == "session.created"
