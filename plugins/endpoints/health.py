"""GET /health and GET /version (both open without an API key)."""

from __future__ import annotations

from litestar import Response, get

from patchbay import __version__, hookimpl
from patchbay.serving import ServingDep


@get("/health")
async def health(serving: ServingDep) -> Response:
    if serving.engine.dead is not None:
        return Response(content={"error": {"message": serving.engine.dead, "type": "server_error", "param": None,
                                           "code": None}}, status_code=503)
    return Response(content=b"", status_code=200)


@get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@hookimpl
def register_routes(register):
    register(health)
    register(version)
