"""GET /openapi.json (the document of every registered route, generated from their attrs request types) and
GET /docs (Swagger UI). With ``--enable-offline-docs`` the page's script and stylesheet are served from the
installed ``swagger-ui-py`` package instead of a CDN.

Both stay open without an API key, as /health does (and as vLLM leaves them): they describe the API's
shape — the same for every patchbay server — and name no model, key or data.
"""

from __future__ import annotations

import importlib.resources

from litestar import Request, Response, get

from patchbay import __version__, hookimpl
from patchbay.openapi import openapi_document
from patchbay.protocol import dumps
from patchbay.serving import ServingDep

CDN = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"
#: the assets the page needs, by the name it is served under in /docs/
ASSETS = {"swagger-ui-bundle.js": "application/javascript", "swagger-ui.css": "text/css"}

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>patchbay API</title><link rel="stylesheet" href="{base}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{base}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});</script>
</body>
</html>
"""


@get("/openapi.json", opt={"auth": False}, media_type="application/json")
async def openapi_json(request: Request, serving: ServingDep) -> Response:
    """The OpenAPI document of this server's routes."""
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = dumps(openapi_document(request.app, title="patchbay", version=__version__,
                                               secured=bool(serving.config.api_key)))
    return Response(content=state.openapi, media_type="application/json")


@get("/docs", opt={"auth": False}, media_type="text/html")
async def docs(serving: ServingDep) -> str:
    """Swagger UI over /openapi.json."""
    return PAGE.format(base="/docs" if serving.config.enable_offline_docs else CDN)


def _asset(name: str, media_type: str):
    async def serve_asset(serving: ServingDep) -> Response:
        if not serving.config.enable_offline_docs:
            return Response(content=b"", status_code=404)
        data = (importlib.resources.files("swagger_ui") / "static" / name).read_bytes()
        return Response(content=data, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})

    serve_asset.__doc__ = f"Swagger UI's {name} (with --enable-offline-docs)."
    return get(f"/docs/{name}", opt={"auth": False, "openapi": False}, name=f"docs-{name}")(serve_asset)


ASSET_ROUTES = [_asset(name, media) for name, media in ASSETS.items()]


@hookimpl
def register_routes(register):
    register(openapi_json)
    register(docs)
    for route in ASSET_ROUTES:
        register(route)
