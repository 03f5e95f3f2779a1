"""The replica's ASGI wrapper: every HTTP response says which replica answered.

Pure ASGI (no Ray import): ``X-Patchbay-Replica: <replica id>`` is added to
the start of every HTTP response the patchbay app sends — answers, errors,
401s and streams alike. The id is the one Ray Serve's status API reports
(``GET /api/serve/applications/`` on the dashboard).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

#: the response header naming the replica
HEADER = "X-Patchbay-Replica"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ReplicaHeader:
    """``app`` with ``X-Patchbay-Replica: replica_id`` on every HTTP response."""

    def __init__(self, app: Any, replica_id: str):
        #: the wrapped app (a patchbay Litestar app: ``app.state.serving`` holds its models)
        self.app = app
        self.replica_id = replica_id
        self._header = (HEADER.lower().encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self._header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
