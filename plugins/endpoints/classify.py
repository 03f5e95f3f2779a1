"""POST /classify — vLLM's classification API for sequence-classification models."""

from __future__ import annotations

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.protocol import parse_body
from patchbay.serving import ServingDep
from patchbay_plugins.endpoints.poolingkit import (
    InputFields,
    class_probs,
    encode_prompts,
    input_prompts,
    json_response,
    now,
    usage,
)
from patchbay_plugins.endpoints.streaming import until_disconnect


@attrs.define(kw_only=True)
class ClassificationRequest(InputFields):
    pass


@post("/classify", status_code=200)
async def create_classification(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), ClassificationRequest)
    model = serving.check_model(req.model)
    serving.require_task("classify")
    req.validate_common(serving)
    prompts = input_prompts(serving, req)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "classify")
    num_tokens = sum(len(p.ids) for p in prompts)
    serving.log_request(rid, num_tokens, {"inputs": len(prompts)})
    logits = await until_disconnect(request, encode_prompts(serving, engine_rid, prompts, "classify", req.priority))
    id2label = getattr(serving.loaded.model, "id2label", {}) or {}
    data = []
    for i, row in enumerate(logits):
        probs = class_probs(serving, row)
        best = int(probs.argmax())
        data.append({"index": i, "label": id2label.get(best, f"LABEL_{best}"), "probs": probs.tolist(),
                     "num_classes": int(probs.shape[-1])})
    return json_response({"id": rid, "object": "list", "created": now(), "model": model, "data": data,
                          "usage": usage(num_tokens)}, headers)


@hookimpl
def register_routes(register):
    register(create_classification)
