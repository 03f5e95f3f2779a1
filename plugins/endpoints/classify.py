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
    list_response,
    pool_inputs,
    usage,
)


@attrs.define(kw_only=True)
class ClassificationRequest(InputFields):
    pass


@post("/classify", status_code=200)
async def create_classification(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), ClassificationRequest)
    model = serving.check_model(req.model)
    serving.require_task("classify")
    req.validate_common(serving)
    logits, num_tokens, rid, headers = await pool_inputs(request, serving, req, "classify", "classify")
    id2label = getattr(serving.loaded.model, "id2label", {}) or {}
    data = []
    for i, row in enumerate(logits):
        probs = class_probs(serving, row)
        best = int(probs.argmax())
        data.append({"index": i, "label": id2label.get(best, f"LABEL_{best}"), "probs": probs.tolist(),
                     "num_classes": int(probs.shape[-1])})
    return list_response(rid, model, data, usage(num_tokens), headers)


@hookimpl
def register_routes(register):
    register(create_classification)
