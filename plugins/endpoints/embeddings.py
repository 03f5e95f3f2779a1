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
    encode_vector,
    list_response,
    pool_inputs,
    usage,
)


@attrs.define(kw_only=True)
class EmbeddingRequest(InputFields):
    #: "float" (a list of numbers) or "base64" (little-endian float32 bytes; the openai client's default)
    encoding_format: str = "float"
    #: Matryoshka truncation (then re-normalisation), for models marked for it
    dimensions: int | None = None


@post("/v1/embeddings", status_code=200)
async def create_embeddings(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), EmbeddingRequest)
    model, name = serving.resolve(req.model)
    model.require_task("embed")
    req.validate_common(model)
    check_encoding_format(req.encoding_format)
    dims = check_dimensions(model, req.dimensions)
    vectors, num_tokens, rid, headers = await pool_inputs(
        request, serving, model, req, "embed", "embd", {"dimensions": dims, "encoding_format": req.encoding_format},
        dimensions=dims)
    data = [{"index": i, "object": "embedding", "embedding": encode_vector(vec, req.encoding_format)}
            for i, vec in enumerate(vectors)]
    return list_response(rid, name, data, usage(num_tokens), headers)


@hookimpl
def register_routes(register):
    register(create_embeddings)
