"""Scores of text pairs on a served pooling model, shared by /score and the rerank endpoints.

The model's rule decides (:meth:`patchbay.served.ServedModel.score`): a cross-encoder (a
classifier with one output) reads each pair as one input; an embedding model (bi-encoder)
embeds both texts and the score is their cosine similarity. Here the pairs become prompts.
On a dual encoder (CLIP) a second item may be an image (:class:`~patchbay_plugins.endpoints.mminputs.ImageRef`):
the score is the cosine of the query's text embedding and the image's embedding.
Not a plugin itself.
"""

from __future__ import annotations

from typing import Any

import attrs

from patchbay.errors import bad_request
from patchbay.served import ServedModel
from patchbay_plugins.endpoints.mminputs import ImageRef, Item, item_prompts
from patchbay_plugins.endpoints.poolingkit import PoolPrompt, Truncation, check_cross_encoder, pair_prompts, prompts_of


@attrs.define
class ScoreJob:
    """Validated pairs, ready to run: ``firsts[i]`` against ``seconds[i]``."""

    firsts: list[str]
    #: texts, or images (:class:`ImageRef`) on a model that embeds images
    seconds: list[Item]
    #: request field of each first / second text, for error messages
    first_params: list[str]
    second_params: list[str]
    #: the request's own truncation (``truncate_prompt_tokens``), else None
    truncation: Truncation | None = None
    #: cut long second texts (documents) to fit instead of refusing them
    fit_second: bool = False
    #: cut second texts to at most this many tokens (Cohere's ``max_tokens_per_doc``)
    max_second_tokens: int | None = None


async def build_prompts(model: ServedModel, job: ScoreJob) -> tuple[list[PoolPrompt], list[tuple[int, int]] | None]:
    """``(prompts, pairs)``: for a cross-encoder one prompt per pair (pairs None); for a bi-encoder
    the unique first texts then the second texts (or images), and which two prompts each pair compares."""
    images = [param for param, item in zip(job.second_params, job.seconds) if isinstance(item, ImageRef)]
    if images:
        model.images.require(images[0])
    if model.pooling.score_rule == "cross-encoder":
        if images:
            raise bad_request("This model scores text pairs; image documents need a model that embeds images.",
                              param=images[0], code="unsupported_content")
        check_cross_encoder(model)
        prompts = pair_prompts(model, job.firsts, job.seconds, params=job.second_params,
                               first_param=job.first_params[0], truncation=job.truncation,
                               fit_second=job.fit_second, max_second_tokens=job.max_second_tokens)
        return prompts, None
    unique: dict[str, int] = {}
    first_items = []
    for text, param in zip(job.firsts, job.first_params):
        if text not in unique:
            unique[text] = len(unique)
            first_items.append((param, text))
    firsts = prompts_of(model, first_items, add_special_tokens=True, truncation=job.truncation)
    second_trunc = job.truncation
    if second_trunc is None and (job.fit_second or job.max_second_tokens is not None):
        limit = model.max_input_tokens
        keep = limit
        if job.max_second_tokens is not None:
            keep = min(limit, job.max_second_tokens + model.tokenizer.num_special_tokens_to_add(False))
        second_trunc = Truncation(keep, "right")
    seconds = await item_prompts(model, list(zip(job.second_params, job.seconds)), lambda items: prompts_of(
        model, items, add_special_tokens=True, truncation=second_trunc))
    pairs = [(unique[t], len(firsts) + i) for i, t in enumerate(job.firsts)]
    return firsts + seconds, pairs


async def run_scores(model: ServedModel, engine_rid: str, prepared: tuple[list[PoolPrompt], Any],
                     priority: int = 0) -> tuple[list[float], int]:
    """``(score per pair, prompt tokens used)`` of :func:`build_prompts`' output."""
    prompts, pairs = prepared
    scores = await model.score(engine_rid, [(p.ids, p.token_type_ids) for p in prompts], pairs, priority=priority,
                               mm=[p.mm for p in prompts])
    return scores, sum(len(p.ids) for p in prompts)
