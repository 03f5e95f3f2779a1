"""POST /classify — vLLM's classification API for sequence-classification models."""

from __future__ import annotations

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.protocol import parse_body
from patchbay.serving import ServingDep
from patchbay.vectors import to_list
from patchbay_plugins.endpoints.poolingkit import InputFields, list_response, pool_inputs, usage


@attrs.define(kw_only=True)
class ClassificationRequest(InputFields):
    pass


@post("/classify", status_code=200, opt={"body": ClassificationRequest})
async def create_classification(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), ClassificationRequest)
    model, name = serving.resolve(req.model)
    model.require_task("classify")
    req.validate_common(model)
    outs, num_tokens, rid, headers = await pool_inputs(request, serving, model, req, "classify", "classify")
    labels = model.pooling.labels
    data = []
    for i, out in enumerate(outs):
        probs = to_list(out)
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append({"index": i, "label": labels[best] if best < len(labels) else f"LABEL_{best}", "probs": probs,
                     "num_classes": len(probs)})
    return list_response(rid, name, data, usage(num_tokens), headers)


@hookimpl
def register_routes(register):
    register(create_classification)
