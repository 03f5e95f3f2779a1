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
    encode_prompts,
    encode_vector,
    finish_embedding,
    input_prompts,
    json_response,
    now,
    usage,
)
from patchbay_plugins.endpoints.streaming import until_disconnect


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
    prompts = input_prompts(serving, req)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "pool")
    num_tokens = sum(len(p.ids) for p in prompts)
    serving.log_request(rid, num_tokens, {"inputs": len(prompts), "task": task})
    vectors = await until_disconnect(request, encode_prompts(serving, engine_rid, prompts, task, req.priority))
    if task == "classify":
        vectors = [class_probs(serving, v) for v in vectors]
    else:
        vectors = [finish_embedding(serving, v, dims) for v in vectors]
    data = [{"index": i, "object": "pooling", "data": encode_vector(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    return json_response({"id": rid, "object": "list", "created": now(), "model": model, "data": data,
                          "usage": usage(num_tokens)}, headers)


@hookimpl
def register_routes(register):
    register(create_pooling)
