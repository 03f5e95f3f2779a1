"""POST /pooling — vLLM's pooling API: what the served pooling model produces for each input
(embeddings for embedding models, class probabilities for classifiers)."""

from __future__ import annotations

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.protocol import parse_body
from patchbay.serving import ServingDep
from patchbay_plugins.endpoints.embeddings import EmbeddingRequest, pooled_list


@attrs.define(kw_only=True)
class PoolingRequest(EmbeddingRequest):
    """As an embeddings request (``dimensions`` applies to embedding models only)."""


@post("/pooling", status_code=200, opt={"body": PoolingRequest})
async def create_pooling(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), PoolingRequest)
    return await pooled_list(request, serving, req, ("embed", "classify"), prefix="pool", obj="pooling", key="data")


@hookimpl
def register_routes(register):
    register(create_pooling)
