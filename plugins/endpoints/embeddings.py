"""POST /v1/embeddings — OpenAI's embeddings, with vLLM's extras (chat-shaped ``messages``,
``truncate_prompt_tokens``, ``add_special_tokens``, ``priority``, ``request_id``)."""

from __future__ import annotations

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.protocol import parse_body
from patchbay.serving import ServingDep
from patchbay_plugins.endpoints.poolingkit import (
    InputFields,
    check_dimensions,
    check_encoding_format,
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
class EmbeddingRequest(InputFields):
    #: "float" (a list of numbers) or "base64" (little-endian float32 bytes; the openai client's default)
    encoding_format: str = "float"
    #: Matryoshka truncation (then re-normalisation), for models marked for it
    dimensions: int | None = None


@post("/v1/embeddings", status_code=200)
async def create_embeddings(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), EmbeddingRequest)
    model = serving.check_model(req.model)
    serving.require_task("embed")
    req.validate_common(serving)
    check_encoding_format(req.encoding_format)
    dims = check_dimensions(serving, req.dimensions)
    prompts = input_prompts(serving, req)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "embd")
    num_tokens = sum(len(p.ids) for p in prompts)
    serving.log_request(rid, num_tokens, {"inputs": len(prompts), "dimensions": dims,
                                          "encoding_format": req.encoding_format})
    vectors = await until_disconnect(request, encode_prompts(serving, engine_rid, prompts, "embed", req.priority))
    data = [
        {"index": i, "object": "embedding",
         "embedding": encode_vector(finish_embedding(serving, vec, dims), req.encoding_format)}
        for i, vec in enumerate(vectors)
    ]
    return json_response({"id": rid, "object": "list", "created": now(), "model": model, "data": data,
                          "usage": usage(num_tokens)}, headers)


@hookimpl
def register_routes(register):
    register(create_embeddings)
