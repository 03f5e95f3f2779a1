"""POST /pooling — vLLM's pooling API: what the served pooling model produces for each input
(embeddings for embedding models, class probabilities for classifiers)."""

from __future__ import annotations

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.errors import bad_request
from patchbay.protocol import parse_body
from patchbay.serving import ServingDep
from patchbay_plugins.endpoints.embeddings import EmbeddingRequest
from patchbay_plugins.endpoints.poolingkit import (
    check_dimensions,
    check_encoding_format,
    encode_vector,
    list_response,
    pool_inputs,
    usage,
)


@attrs.define(kw_only=True)
class PoolingRequest(EmbeddingRequest):
    """As an embeddings request (``dimensions`` applies to embedding models only)."""


@post("/pooling", status_code=200)
async def create_pooling(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), PoolingRequest)
    model, name = serving.resolve(req.model)
    task = model.require_task("embed", "classify")
    req.validate_common(model)
    check_encoding_format(req.encoding_format)
    if task == "classify" and req.dimensions is not None:
        raise bad_request("dimensions applies to embedding models; this one is a classifier.", param="dimensions")
    dims = check_dimensions(model, req.dimensions)
    outs, num_tokens, rid, headers = await pool_inputs(request, serving, model, req, task, "pool", {"task": task},
                                                       dimensions=dims)
    data = [{"index": i, "object": "pooling", "data": encode_vector(v, req.encoding_format)}
            for i, v in enumerate(outs)]
    return list_response(rid, name, data, usage(num_tokens), headers)


@hookimpl
def register_routes(register):
    register(create_pooling)
