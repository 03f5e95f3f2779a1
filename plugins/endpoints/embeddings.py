"""POST /v1/embeddings — OpenAI's embeddings, with vLLM's extras (chat-shaped ``messages``,
``truncate_prompt_tokens``, ``add_special_tokens``, ``priority``, ``request_id``)."""

from __future__ import annotations

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.errors import bad_request
from patchbay.protocol import parse_body
from patchbay.serving import Serving, ServingDep
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


async def pooled_list(request: Request, serving: Serving, req: EmbeddingRequest, tasks: tuple[str, ...], *,
                      prefix: str, obj: str, key: str) -> Response:
    """Pool each input with the first of ``tasks`` the model runs; vLLM's list answer, each output under ``key``."""
    model, name = serving.resolve(req.model)
    task = model.require_task(*tasks)
    req.validate_common(model)
    check_encoding_format(req.encoding_format)
    if task != "embed" and req.dimensions is not None:
        raise bad_request("dimensions applies to embedding models; this one is a classifier.", param="dimensions")
    dims = check_dimensions(model, req.dimensions)
    outs, num_tokens, rid, headers = await pool_inputs(
        request, serving, model, req, task, prefix,
        {"task": task, "dimensions": dims, "encoding_format": req.encoding_format}, dimensions=dims)
    data = [{"index": i, "object": obj, key: encode_vector(v, req.encoding_format)} for i, v in enumerate(outs)]
    return list_response(rid, name, data, usage(num_tokens), headers)


@post("/v1/embeddings", status_code=200, opt={"body": EmbeddingRequest})
async def create_embeddings(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), EmbeddingRequest)
    return await pooled_list(request, serving, req, ("embed",), prefix="embd", obj="embedding", key="embedding")


@hookimpl
def register_routes(register):
    register(create_embeddings)
