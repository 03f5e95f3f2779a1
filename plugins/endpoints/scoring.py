"""Scores of text pairs on the served pooling model, shared by /score and the rerank endpoints.

A cross-encoder (a classifier with one output) reads each pair as one input and its logit,
through the model's activation (sigmoid unless its sentence-transformers config names
another), is the score. An embedding model (bi-encoder) embeds both texts and the score is
their cosine similarity. Not a plugin itself.
"""

from __future__ import annotations

from typing import Any

import attrs

from patchbay.serving import Serving
from patchbay_plugins.endpoints.poolingkit import (
    PoolPrompt,
    Truncation,
    check_cross_encoder,
    cross_encoder_score,
    encode_prompts,
    pair_prompts,
    prompt_limit,
    prompts_of,
)


@attrs.define
class ScoreJob:
    """Validated pairs, ready to run: ``firsts[i]`` against ``seconds[i]``."""

    firsts: list[str]
    seconds: list[str]
    #: request field of each first / second text, for error messages
    first_params: list[str]
    second_params: list[str]
    #: the request's own truncation (``truncate_prompt_tokens``), else None
    truncation: Truncation | None = None
    #: cut long second texts (documents) to fit instead of refusing them
    fit_second: bool = False
    #: cut second texts to at most this many tokens (Cohere's ``max_tokens_per_doc``)
    max_second_tokens: int | None = None


def is_cross_encoder(serving: Serving) -> bool:
    return serving.loaded.task == "classify"


def build_prompts(serving: Serving, job: ScoreJob) -> tuple[list[PoolPrompt], list[int] | None, list[int] | None]:
    """``(prompts, first_rows, second_rows)``: for a cross-encoder one prompt per pair (rows None);
    for a bi-encoder the unique first texts then the second texts, and which row each pair reads."""
    if is_cross_encoder(serving):
        check_cross_encoder(serving)
        prompts = pair_prompts(serving, job.firsts, job.seconds, params=job.second_params,
                               first_param=job.first_params[0], truncation=job.truncation,
                               fit_second=job.fit_second, max_second_tokens=job.max_second_tokens)
        return prompts, None, None
    unique: dict[str, int] = {}
    first_items = []
    for text, param in zip(job.firsts, job.first_params):
        if text not in unique:
            unique[text] = len(unique)
            first_items.append((param, text))
    firsts = prompts_of(serving, first_items, add_special_tokens=True, truncation=job.truncation)
    second_trunc = job.truncation
    if second_trunc is None and (job.fit_second or job.max_second_tokens is not None):
        limit = prompt_limit(serving)
        keep = limit
        if job.max_second_tokens is not None:
            keep = min(limit, job.max_second_tokens + serving.tokenizer.num_special_tokens_to_add(False))
        second_trunc = Truncation(keep, "right")
    seconds = prompts_of(serving, list(zip(job.second_params, job.seconds)), add_special_tokens=True,
                         truncation=second_trunc)
    first_rows = [unique[t] for t in job.firsts]
    second_rows = [len(firsts) + i for i in range(len(seconds))]
    return firsts + seconds, first_rows, second_rows


async def run_scores(serving: Serving, engine_rid: str, job: ScoreJob, priority: int = 0,
                     prepared: Any = None) -> tuple[list[float], int]:
    """``(score per pair, prompt tokens used)``."""
    prompts, first_rows, second_rows = prepared if prepared is not None else build_prompts(serving, job)
    num_tokens = sum(len(p.ids) for p in prompts)
    if first_rows is None:
        logits = await encode_prompts(serving, engine_rid, prompts, "classify", priority)
        return [cross_encoder_score(serving, row) for row in logits], num_tokens
    import torch
    import torch.nn.functional as F

    vectors = await encode_prompts(serving, engine_rid, prompts, "embed", priority)
    a = torch.stack([vectors[r] for r in first_rows])
    b = torch.stack([vectors[r] for r in second_rows])
    return F.cosine_similarity(a, b, dim=-1).tolist(), num_tokens
