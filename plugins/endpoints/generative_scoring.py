"""POST /generative_scoring — score items against a query with a causal LM's next-token probabilities.

Each item is joined to the query (``query + item``, or ``item + query`` with ``item_first``;
the leading part is tokenized with the special tokens, the other without, so a BOS token
stays in front) and the model's next-token distribution is read at the ids of
``label_token_ids``. The score is the probability of the first label: softmax-normalised over
the label ids (``apply_softmax``, the default), else its probability over the whole
vocabulary. All items run concurrently on the shared engine (and share the query's prefix
cache blocks).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.engine.params import SamplingParams
from patchbay.errors import APIError, bad_request
from patchbay.protocol import parse_body
from patchbay.served import ServedModel
from patchbay.serving import ServingDep
from patchbay_plugins.endpoints.poolingkit import list_response
from patchbay_plugins.endpoints.streaming import raise_engine_error, until_disconnect


@attrs.define(kw_only=True)
class GenerativeScoringRequest:
    query: str | list[int]
    items: list[str | list[int]]
    label_token_ids: list[int]
    model: str | None = None
    apply_softmax: bool = True
    item_first: bool = False
    add_special_tokens: bool = True
    priority: int = 0
    request_id: str | None = None


def _ids(model: ServedModel, value: str | list[int], param: str, add_special_tokens: bool) -> list[int]:
    if isinstance(value, str):
        if not value:
            raise bad_request(f"{param} must not be empty.", param=param)
        return model.encode(value, add_special_tokens=add_special_tokens)
    if not value:
        raise bad_request(f"{param} must not be empty.", param=param)
    model.check_prompt_ids(value, param)
    return list(value)


def build_prompts(model: ServedModel, req: GenerativeScoringRequest) -> list[list[int]]:
    if not req.items:
        raise bad_request("items must contain at least one item.", param="items")
    if not req.label_token_ids:
        raise bad_request("label_token_ids must contain at least one token id.", param="label_token_ids")
    vocab = model.vocab_size
    for i, t in enumerate(req.label_token_ids):
        if not 0 <= t < vocab:
            raise bad_request(f"label_token_ids[{i}] = {t} is not a token id of this model (0..{vocab - 1}).",
                              param=f"label_token_ids[{i}]")
    if len(set(req.label_token_ids)) != len(req.label_token_ids):
        raise bad_request("label_token_ids must not repeat an id.", param="label_token_ids")
    if req.priority and model.config.scheduling_policy != "priority":
        raise bad_request("priority needs a server started with --scheduling-policy priority.", param="priority")
    if req.request_id is not None and not req.request_id:
        raise bad_request("request_id must not be empty.", param="request_id")
    special = req.add_special_tokens
    query = _ids(model, req.query, "query", special and not req.item_first)
    prompts = []
    for i, item in enumerate(req.items):
        param = f"items[{i}]"
        ids = _ids(model, item, param, special and req.item_first)
        prompt = ids + query if req.item_first else query + ids
        model.check_length(len(prompt), param)
        prompts.append(prompt)
    return prompts


def score_of(requested: list[tuple[int, float]], labels: list[int], apply_softmax: bool) -> float:
    by_id = dict(requested)
    lps = [by_id[t] for t in labels]
    if not apply_softmax:
        return math.exp(lps[0])
    top = max(lps)
    weights = [math.exp(lp - top) for lp in lps]
    return weights[0] / sum(weights)


async def _one(model: ServedModel, rid: str, ids: list[int], labels: tuple[int, ...], priority: int) -> Any:
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, logprob_token_ids=labels, detokenize=False)
    last = None
    async for out in model.generate(rid, ids, params, priority=priority):
        raise_engine_error(out)
        if out.logprobs:
            last = out.logprobs[0]
    if last is None:
        raise APIError("The engine returned no next-token distribution.", status=500, type="server_error")
    return last.requested


async def run(model: ServedModel, engine_rid: str, prompts: list[list[int]], labels: tuple[int, ...],
              priority: int) -> list[Any]:
    admission = model.admit(len(prompts))
    tasks = [asyncio.ensure_future(_one(model, f"{engine_rid}-{i}", p, labels, priority))
             for i, p in enumerate(prompts)]
    try:
        return await asyncio.gather(*tasks)
    finally:
        admission.release()
        for t in tasks:
            t.cancel()


@post("/generative_scoring", status_code=200, opt={"body": GenerativeScoringRequest})
async def generative_scoring(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), GenerativeScoringRequest)
    model, name = serving.resolve(req.model)
    model.require_task("generate")
    prompts = build_prompts(model, req)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "generative-scoring")
    prompt_tokens = sum(len(p) for p in prompts)
    serving.log_request(rid, prompt_tokens, {"items": len(prompts), "label_token_ids": req.label_token_ids})
    labels = tuple(req.label_token_ids)
    found = await until_disconnect(request, run(model, engine_rid, prompts, labels, req.priority))
    data = [{"index": i, "object": "score", "score": score_of(r, req.label_token_ids, req.apply_softmax)}
            for i, r in enumerate(found)]
    completion = len(prompts)
    return list_response(rid, name, data, {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion,
                                            "completion_tokens": completion}, headers)


@hookimpl
def register_routes(register):
    register(generative_scoring)
