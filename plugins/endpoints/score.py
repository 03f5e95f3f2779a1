"""POST /score and /v1/score — vLLM's score API: ``text_1`` against ``text_2``.

One to one (two strings), one to many (a string, or a one-item list, against a list) and many
to many (two lists of the same length, zipped). A cross-encoder scores each pair; an embedding
model gives the cosine similarity of the two embeddings. The later spellings of the pair
(``queries`` + ``documents`` / ``items``, ``data_1`` + ``data_2``) are accepted too.

On a model that embeds images (CLIP), the second side may hold images: ``{"content": [parts]}`` (vLLM's
form: each ``image_url`` or ``text`` part is one item), or list entries of that form with one part.
"""

from __future__ import annotations

from typing import Any

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.errors import bad_request
from patchbay.protocol import parse_body
from patchbay.serving import ServingDep
from patchbay_plugins.endpoints.mminputs import Item, MultimodalContent, part_item, single_item
from patchbay_plugins.endpoints.poolingkit import PoolingFields, check_encoding_format, list_response, usage
from patchbay_plugins.endpoints.scoring import ScoreJob, build_prompts, run_scores
from patchbay_plugins.endpoints.streaming import until_disconnect

ScoreInputs = str | list[str | MultimodalContent] | MultimodalContent

#: the accepted spellings of the two sides, first is the documented one
SPELLINGS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))


@attrs.define(kw_only=True)
class ScoreRequest(PoolingFields):
    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None
    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    items: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None
    #: accepted as vLLM's examples send it; scores are plain numbers either way
    encoding_format: str = "float"


def sides(req: ScoreRequest) -> tuple[str, Any, str, Any]:
    """``(name_1, value_1, name_2, value_2)`` of the one spelling the request uses."""
    used = [(a, b) for a, b in SPELLINGS if getattr(req, a) is not None and getattr(req, b) is not None]
    given = [n for n in ("text_1", "text_2", "queries", "documents", "items", "data_1", "data_2")
             if getattr(req, n) is not None]
    if len(used) != 1 or len(given) != 2:
        if not given:
            raise bad_request("'text_1' is a required property", param="text_1")
        if len(given) == 1:
            missing = {"text_1": "text_2", "text_2": "text_1", "data_1": "data_2", "data_2": "data_1",
                       "queries": "documents", "documents": "queries", "items": "queries"}[given[0]]
            raise bad_request(f"'{missing}' is a required property", param=missing)
        raise bad_request(f"Give the two sides once, as text_1 and text_2; this request has {', '.join(given)}.",
                          param=given[-1])
    a, b = used[0]
    return a, getattr(req, a), b, getattr(req, b)


def side_items(name: str, value: Any) -> tuple[list[Item], list[str]]:
    """A side's items (texts, or images given as content parts) and the field naming each."""
    if isinstance(value, str):
        return [value], [name]
    if isinstance(value, MultimodalContent):
        params = [f"{name}.content[{j}]" for j in range(len(value.content))]
        return [part_item(p, param) for p, param in zip(value.content, params)], params
    params = [f"{name}[{i}]" for i in range(len(value))]
    items = [v if isinstance(v, str) else single_item(v.content, f"{param}.content") for v, param in zip(value, params)]
    return items, params


def pairs(name_1: str, value_1: Any, name_2: str, value_2: Any) -> ScoreJob:
    """Broadcast the two sides into pairs: 1:1, 1:N or N:N (zipped)."""
    list_1, _ = side_items(name_1, value_1)
    list_2, params_2 = side_items(name_2, value_2)
    for i, item in enumerate(list_1):
        if not isinstance(item, str):
            raise bad_request(f"{name_1} must be text: the query side is embedded as text.", param=name_1)
    if not list_1:
        raise bad_request(f"{name_1} must not be empty.", param=name_1)
    if not list_2:
        raise bad_request(f"{name_2} must not be empty.", param=name_2)
    if len(list_1) > 1 and len(list_1) != len(list_2):
        raise bad_request(f"{name_1} has {len(list_1)} texts and {name_2} has {len(list_2)}: give one {name_1} "
                          f"for all of {name_2}, or as many as {name_2} has (they are paired in order).",
                          param=name_2)
    params_1 = [name_1 if isinstance(value_1, str) else f"{name_1}[{i if len(list_1) > 1 else 0}]"
                for i in range(len(list_2))]
    firsts = list_1 * len(list_2) if len(list_1) == 1 else list_1
    for texts, params in ((firsts, params_1), (list_2, params_2)):
        for text, param in zip(texts, params):
            if isinstance(text, str) and not text:
                raise bad_request(f"{param} must not be an empty string.", param=param)
    return ScoreJob(firsts, list_2, params_1, params_2)


@post(["/score", "/v1/score"], status_code=200, opt={"body": ScoreRequest})
async def create_score(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), ScoreRequest)
    model, name = serving.resolve(req.model)
    model.require_task("score")
    req.validate_common(model)
    check_encoding_format(req.encoding_format)
    job = pairs(*sides(req))
    job.truncation = req.truncation(model)
    prepared = await build_prompts(model, job)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "score")
    scores, num_tokens = await until_disconnect(request, run_scores(model, engine_rid, prepared, req.priority))
    serving.log_request(rid, num_tokens, {"pairs": len(scores)})
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return list_response(rid, name, data, usage(num_tokens), headers)


@hookimpl
def register_routes(register):
    register(create_score)
