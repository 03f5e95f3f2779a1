"""POST /rerank, /v1/rerank (Jina AI and Cohere v1) and /v2/rerank (Cohere v2).

One query against many documents, scored by the served model (a cross-encoder, or an
embedding model's cosine similarity), results sorted best first. Documents are strings or
objects (Cohere v1: ``text`` is read, or the ``rank_fields`` in order); ``document`` is in a
result only when ``return_documents`` is true (strict clients reject a ``null`` one). Long
documents are cut to fit the model (or to ``max_tokens_per_doc``); ``max_chunks_per_doc`` is
accepted and has no effect (documents are truncated, never chunked).

On a model that embeds images (CLIP), a document may be an image: ``{"content": [image_url part]}``, Jina's
``{"image": url}``, or ``documents`` as one ``{"content": [parts]}`` object (vLLM's form, each part a
document); the score is the cosine of the query's text embedding and the image's embedding.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.errors import bad_request
from patchbay.protocol import parse_body
from patchbay.served import ServedModel
from patchbay.serving import Serving, ServingDep
from patchbay_plugins.endpoints.mminputs import ImageRef, Item, MultimodalContent, part_item, single_item
from patchbay_plugins.endpoints.poolingkit import PoolingFields, json_response
from patchbay_plugins.endpoints.scoring import ScoreJob, build_prompts, run_scores
from patchbay_plugins.endpoints.streaming import until_disconnect


@attrs.define(kw_only=True)
class RelevantSpans:
    """Cohere v2's ``relevant_spans`` (rerank v5 models); only ``mode: disabled`` is served."""

    mode: str
    threshold: float | None = None
    max_spans: int | None = None


@attrs.define(kw_only=True)
class RerankRequest(PoolingFields):
    query: str
    documents: list[str | dict[str, Any]] | MultimodalContent
    #: results to return (None / 0: all)
    top_n: int | None = None
    return_documents: bool | None = None
    #: Cohere v1: the object fields to rank on, in order (default: ``text``)
    rank_fields: list[str] | None = None
    #: Cohere v1 (tolerated: documents are truncated, not chunked)
    max_chunks_per_doc: int | None = None
    #: Cohere v2: cut each document to this many tokens
    max_tokens_per_doc: int | None = None
    relevant_spans: RelevantSpans | None = None


def document_text(doc: str | dict[str, Any], rank_fields: list[str] | None, param: str) -> Item:
    """What a document is ranked on: the string itself, its ``text``, or its ``rank_fields`` (one field: its
    value; several: ``field: value`` lines, in the order given); or its image (``content`` parts, ``image``)."""
    if isinstance(doc, str):
        return doc
    fields = rank_fields or ["text"]
    if isinstance(doc.get("content"), list) and not any(f in doc for f in fields):
        return single_item(doc["content"], f"{param}.content")
    if isinstance(doc.get("image"), str) and not any(f in doc for f in fields):
        return ImageRef(doc["image"])
    values = []
    for name in fields:
        if name not in doc:
            continue
        value = doc[name]
        if not isinstance(value, str):
            raise bad_request(f"{param}.{name} must be a string.", param=f"{param}.{name}")
        values.append((name, value))
    if not values:
        wanted = ", ".join(repr(f) for f in fields)
        raise bad_request(f"{param} has none of the fields ranked on ({wanted}).", param=param)
    if len(values) == 1:
        return values[0][1]
    return "\n".join(f"{name}: {value}" for name, value in values)


def document_param(doc: Any, index: int) -> str:
    """The field naming a document in errors: an image's own part where it has one."""
    if isinstance(doc, dict) and isinstance(doc.get("content"), list):
        return f"documents[{index}].content[0]"
    if isinstance(doc, dict) and "image" in doc and "text" not in doc:
        return f"documents[{index}].image"
    return f"documents[{index}]"


def validate(req: RerankRequest, model: ServedModel) -> None:
    req.validate_common(model)
    if not (req.documents.content if isinstance(req.documents, MultimodalContent) else req.documents):
        raise bad_request("documents must not be empty.", param="documents")
    if not req.query:
        raise bad_request("query must not be empty.", param="query")
    if req.top_n is not None and req.top_n < 0:
        raise bad_request(f"top_n must be at least 0 (got {req.top_n}).", param="top_n")
    if req.max_chunks_per_doc is not None and req.max_chunks_per_doc < 1:
        raise bad_request(f"max_chunks_per_doc must be at least 1 (got {req.max_chunks_per_doc}).",
                          param="max_chunks_per_doc")
    if req.max_tokens_per_doc is not None and req.max_tokens_per_doc < 1:
        raise bad_request(f"max_tokens_per_doc must be at least 1 (got {req.max_tokens_per_doc}).",
                          param="max_tokens_per_doc")
    if req.rank_fields is not None and not req.rank_fields:
        raise bad_request("rank_fields must not be empty.", param="rank_fields")
    spans = req.relevant_spans
    if spans is not None and spans.mode != "disabled":
        raise bad_request("relevant_spans is not supported by this server (only mode 'disabled').",
                          param="relevant_spans.mode", code="unsupported_parameter")


async def rerank(request: Request, serving: Serving, version: str) -> Response:
    req = parse_body(await request.body(), RerankRequest)
    model, name = serving.resolve(req.model)
    model.require_task("score")
    validate(req, model)
    if isinstance(req.documents, MultimodalContent):
        docs: list[Any] = [{"content": [attrs.asdict(p, filter=lambda _, v: v is not None)]}
                           for p in req.documents.content]
        params = [f"documents.content[{j}]" for j in range(len(docs))]
        texts = [part_item(p, param) for p, param in zip(req.documents.content, params)]
    else:
        docs = list(req.documents)
        texts = [document_text(d, req.rank_fields, f"documents[{i}]") for i, d in enumerate(docs)]
        params = [document_param(d, i) for i, d in enumerate(docs)]
    for i, text in enumerate(texts):
        if isinstance(text, str) and not text:
            raise bad_request(f"documents[{i}] must not be empty.", param=f"documents[{i}]")
    job = ScoreJob([req.query] * len(texts), texts, ["query"] * len(texts),
                   params, truncation=req.truncation(model),
                   fit_second=True, max_second_tokens=req.max_tokens_per_doc)
    prepared = await build_prompts(model, job)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "rerank")
    scores, num_tokens = await until_disconnect(request, run_scores(model, engine_rid, prepared, req.priority))
    serving.log_request(rid, num_tokens, {"documents": len(texts), "top_n": req.top_n})
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if req.top_n:
        order = order[: req.top_n]
    results = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            doc = docs[i]
            result["document"] = {"text": doc} if isinstance(doc, str) else doc
        results.append(result)
    meta = {"api_version": {"version": version},
            "billed_units": {"search_units": math.ceil(len(texts) / 100)},
            "tokens": {"input_tokens": num_tokens, "output_tokens": 0}}
    return json_response({"id": rid, "model": name, "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
                          "results": results, "meta": meta}, headers)


@post(["/rerank", "/v1/rerank"], status_code=200, opt={"body": RerankRequest})
async def rerank_v1(request: Request, serving: ServingDep) -> Response:
    """Jina AI's rerank API, which Cohere's v1 rerank shares."""
    return await rerank(request, serving, "1")


@post("/v2/rerank", status_code=200, opt={"body": RerankRequest})
async def rerank_v2(request: Request, serving: ServingDep) -> Response:
    """Cohere's v2 rerank (``max_tokens_per_doc``; v1's fields are tolerated)."""
    return await rerank(request, serving, "2")


@hookimpl
def register_routes(register):
    register(rerank_v1)
    register(rerank_v2)
