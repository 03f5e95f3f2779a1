"""POST /v1/completions — OpenAI's (legacy) text completions."""

from __future__ import annotations

from typing import Any, AsyncIterator

import attrs
from litestar import Request, Response, post
from litestar.response import Stream

from patchbay import hookimpl
from patchbay.errors import APIError, bad_request
from patchbay.protocol import parse_body
from patchbay.serving import Serving, ServingDep, random_id
from patchbay_plugins.endpoints.textgen import (
    NOT_YET_COMMON,
    SSE_DONE,
    SSE_HEADERS,
    SamplingFields,
    child_params,
    error_in_stream,
    merge_streams,
    now,
    raise_engine_error,
    sse,
    until_disconnect,
    usage_dict,
    with_pending_fields,
)

Prompt = str | list[str] | list[int] | list[list[int]]

#: completions' default max_tokens, as OpenAI and vLLM have it
DEFAULT_MAX_TOKENS = 16


@attrs.define(kw_only=True)
class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    suffix: str | None = None


CompletionRequest = with_pending_fields(CompletionRequest, NOT_YET_COMMON)


def _prompts(serving: Serving, req: Any) -> list[tuple[list[int], str | None]]:
    """(token ids, text) per prompt; text is None for token-id prompts."""
    p = req.prompt
    if isinstance(p, str):
        items: list[Any] = [p]
    elif not p:
        raise bad_request("prompt must not be empty.", param="prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    out = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = serving.encode(item)
            text: str | None = item
        else:
            ids = list(item)
            serving.check_prompt_ids(ids, param)
            text = None
        serving.check_length(len(ids), param)
        out.append((ids, text))
    return out


def _completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish: str | None,
                      stop_reason: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                     "stop_reason": stop_reason}],
    }


async def _stream(serving: Serving, req: Any, rid: str, model: str, prompts, params_list) -> AsyncIterator[bytes]:
    created = now()
    streams, prompt_of = [], []
    for p_idx, ((ids, _), params) in enumerate(zip(prompts, params_list)):
        for i in range(req.n):
            streams.append(serving.engine.generate(f"{rid}-{p_idx}-{i}", ids, child_params(params, i)))
            prompt_of.append(p_idx)
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    completion_tokens = [0] * len(streams)
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    echoed = set()
    async for idx, out in merge_streams(streams):
        raise_engine_error(out)
        completion_tokens[idx] = out.num_output_tokens
        text = out.text
        if req.echo and idx not in echoed:
            echoed.add(idx)
            text = _echo_text(serving, prompts[prompt_of[idx]]) + text
        if not text and not out.finished:
            continue
        chunk = _completion_chunk(rid, created, model, idx, text, out.finish_reason, out.stop_reason)
        if include_usage and continuous:
            chunk["usage"] = usage_dict(prompt_tokens, sum(completion_tokens))
        yield sse(chunk)
    if include_usage:
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": usage_dict(prompt_tokens, sum(completion_tokens))})
    yield SSE_DONE


def _echo_text(serving: Serving, prompt: tuple[list[int], str | None]) -> str:
    ids, text = prompt
    return text if text is not None else serving.tokenizer.decode(ids)


async def _collect(serving: Serving, req: Any, rid: str, model: str, prompts, params_list) -> dict[str, Any]:
    streams = []
    for p_idx, ((ids, _), params) in enumerate(zip(prompts, params_list)):
        for i in range(req.n):
            streams.append(serving.engine.generate(f"{rid}-{p_idx}-{i}", ids, child_params(params, i)))
    texts = [""] * len(streams)
    last: list[Any] = [None] * len(streams)
    async for idx, out in merge_streams(streams):
        raise_engine_error(out)
        texts[idx] += out.text
        last[idx] = out
    choices = []
    for idx, out in enumerate(last):
        text = texts[idx]
        if req.echo:
            text = _echo_text(serving, prompts[idx // req.n]) + text
        choices.append({"index": idx, "text": text, "logprobs": None, "finish_reason": out.finish_reason,
                        "stop_reason": out.stop_reason, "prompt_logprobs": None})
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    completion_tokens = sum(out.num_output_tokens for out in last)
    cached = sum(out.num_cached_tokens for out in last[:: req.n])
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage_dict(prompt_tokens, completion_tokens, cached),
        "system_fingerprint": None,
    }


@post("/v1/completions", status_code=200)
async def create_completion(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), CompletionRequest)
    model = serving.check_model(req.model)
    serving.require_task("generate")
    req.validate_sampling()
    if req.suffix is not None:
        raise bad_request("suffix is not supported.", param="suffix", code="unsupported_parameter")
    prompts = _prompts(serving, req)
    vocab = len(serving.tokenizer)
    params_list = [
        req.sampling_params(serving.output_budget(len(ids), req.max_tokens, DEFAULT_MAX_TOKENS), vocab)
        for ids, _ in prompts
    ]
    rid = random_id("cmpl")
    for (ids, _), params in zip(prompts, params_list):
        serving.log_request(rid, len(ids), params)
    if req.stream:
        def on_error(exc: APIError) -> bytes:
            return sse(exc.body())

        gen = error_in_stream(_stream(serving, req, rid, model, prompts, params_list), on_error)
        return Stream(gen, media_type="text/event-stream", headers=SSE_HEADERS)
    body = await until_disconnect(request, _collect(serving, req, rid, model, prompts, params_list))
    return Response(content=body, media_type="application/json")


@hookimpl
def register_routes(register):
    register(create_completion)
