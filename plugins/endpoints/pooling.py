"""POST /pooling — vLLM's pooling API: what the served pooling model produces for each input
(embeddings for embedding models, class probabilities for classifiers)."""

from __future__ import annotations

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.errors import bad_request
from patchbay.protocol import parse_body
from patchbay.serving import ServingDep
from patchbay_plugins.endpoints.poolingkit import (
    InputFields,
    check_dimensions,
    check_encoding_format,
    class_probs,
    encode_vector,
    finish_embedding,
    list_response,
    pool_inputs,
    usage,
)


@attrs.define(kw_only=True)
class PoolingRequest(InputFields):
    encoding_format: str = "float"
    #: Matryoshka truncation (embedding models marked for it)
    dimensions: int | None = None


@post("/pooling", status_code=200)
async def create_pooling(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), PoolingRequest)
    model = serving.check_model(req.model)
    task = serving.require_task("embed", "classify")
    req.validate_common(serving)
    check_encoding_format(req.encoding_format)
    if task == "classify" and req.dimensions is not None:
        raise bad_request("dimensions applies to embedding models; this one is a classifier.", param="dimensions")
    dims = check_dimensions(serving, req.dimensions)
    vectors, num_tokens, rid, headers = await pool_inputs(request, serving, req, task, "pool", {"task": task})
    if task == "classify":
        vectors = [class_probs(serving, v) for v in vectors]
    else:
        vectors = [finish_embedding(serving, v, dims) for v in vectors]
    data = [{"index": i, "object": "pooling", "data": encode_vector(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    return list_response(rid, model, data, usage(num_tokens), headers)


@hookimpl
def register_routes(register):
    register(create_pooling)
