"""POST /v1/completions — OpenAI's (legacy) text completions, with vLLM's extra parameters."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import attrs
from litestar import Request, Response, post
from litestar.response import Stream

from patchbay import hookimpl
from patchbay.errors import bad_request
from patchbay.protocol import parse_body
from patchbay.serving import Serving, ServingDep
from patchbay_plugins.endpoints.generation import Candidate, beam_search, best_n, run_candidates
from patchbay_plugins.endpoints.logprobs import TokenText, completion_logprobs, prompt_logprobs_json
from patchbay_plugins.endpoints.streaming import (
    SSE_DONE,
    SSE_HEADERS,
    error_in_stream,
    merge_streams,
    raise_engine_error,
    sse,
    until_disconnect,
)
from patchbay_plugins.endpoints.textgen import (
    NOT_YET_COMMON,
    SamplingFields,
    child_params,
    instantiate_processors,
    now,
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
    logprobs: int | None = None


CompletionRequest = with_pending_fields(CompletionRequest, NOT_YET_COMMON)


@attrs.define
class PromptInput:
    ids: list[int]
    text: str | None


def _prompts(serving: Serving, req: Any) -> list[PromptInput]:
    p = req.prompt
    if isinstance(p, str):
        items: list[Any] = [p]
    elif not p:
        raise bad_request("prompt must not be empty.", param="prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    add_special = True if req.add_special_tokens is None else req.add_special_tokens
    out = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = serving.encode(item, add_special_tokens=add_special)
        else:
            ids = list(item)
            serving.check_prompt_ids(ids, param)
        truncated = req.truncate(ids, serving)
        serving.check_length(len(truncated), param)
        text = item if isinstance(item, str) and truncated is ids else None
        out.append(PromptInput(truncated, text))
    return out


class CompletionJob:
    """One validated completions request, ready to run."""

    def __init__(self, serving: Serving, req: Any, rid: str, engine_rid: str, model: str, constraint: Any = None):
        self.serving, self.req, self.rid, self.engine_rid, self.model = serving, req, rid, engine_rid, model
        self.constraint = constraint
        self.tt = TokenText(serving, bool(req.return_tokens_as_token_ids))
        self.prompts = _prompts(serving, req)
        self.refs = req.processors(serving)
        self.logprobs = req.logprobs
        if self.logprobs is not None:
            req._check_logprob_count(serving, "logprobs", self.logprobs)
        self.count = req.best_of or req.n
        self.created = now()

    def echo_text(self, prompt: PromptInput) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.serving.tokenizer.decode(prompt.ids, skip_special_tokens=self.req.skip_special_tokens)

    def params(self, prompt: PromptInput, index: int):
        req = self.req
        logprobs = self.logprobs
        if logprobs is None and self.count > req.n:
            logprobs = 0  # best_of ranks candidates by cumulative logprob
        params = req.sampling_params(self.serving, num_prompt_tokens=len(prompt.ids),
                                     default_max_tokens=DEFAULT_MAX_TOKENS, logprobs=logprobs)
        if req.echo and self.logprobs is not None:
            params.prompt_logprobs = max(params.prompt_logprobs or 0, self.logprobs)
        params.constraint = self.constraint
        params = child_params(params, index)
        if self.refs:
            params = attrs.evolve(params, logits_processors=instantiate_processors(self.refs, self.serving,
                                                                                   req.vllm_xargs))
        return params

    def prompt_offsets(self, prompt: PromptInput) -> list[int]:
        offsets, pos = [], 0
        for token in prompt.ids:
            offsets.append(pos)
            pos += len(self.tt.raw(token).decode("utf-8", errors="replace"))
        return offsets

    # ------------------------------------------------------------------ non-streaming

    async def _run_prompt(self, p_idx: int, prompt: PromptInput) -> list[Candidate]:
        req = self.req
        rid = f"{self.engine_rid}-{p_idx}"
        if req.use_beam_search:
            return await beam_search(self.serving, rid, prompt.ids, self.params(prompt, 0), req.n,
                                     length_penalty=req.length_penalty, early_stopping=req.early_stopping,
                                     priority=req.priority, cache_salt=req.cache_salt)
        return await run_candidates(self.serving, rid, prompt.ids, lambda i: self.params(prompt, i), self.count,
                                    priority=req.priority, cache_salt=req.cache_salt)

    async def collect(self) -> dict[str, Any]:
        req = self.req
        tasks = [asyncio.ensure_future(self._run_prompt(i, p)) for i, p in enumerate(self.prompts)]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        choices = []
        prompt_tokens = completion_tokens = cached = 0
        for p_idx, (prompt, cands) in enumerate(zip(self.prompts, results)):
            prompt_tokens += len(prompt.ids)
            completion_tokens += sum(c.num_output_tokens for c in cands)
            cached += max((c.num_cached_tokens for c in cands), default=0)
            plp = next((c.prompt_logprobs for c in cands if c.prompt_logprobs is not None), None)
            for i, cand in enumerate(best_n(cands, req.n)):
                choices.append(self.choice(p_idx * req.n + i, prompt, cand, plp))
        return {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_dict(prompt_tokens, completion_tokens, cached),
            "system_fingerprint": None,
        }

    def choice(self, index: int, prompt: PromptInput, cand: Candidate, plp) -> dict[str, Any]:
        text = cand.text
        base = 0
        if self.req.echo:
            echo = self.echo_text(prompt)
            text = echo + text
            base = len(echo)
        logprobs = None
        if self.logprobs is not None:
            logprobs = completion_logprobs(
                self.tt, cand.logprobs, cand.text_offsets, base_offset=base,
                prompt=plp if self.req.echo else None, prompt_ids=prompt.ids,
                prompt_offsets=self.prompt_offsets(prompt) if self.req.echo else (),
            )
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": cand.finish_reason,
            "stop_reason": cand.stop_reason,
            "prompt_logprobs": prompt_logprobs_json(self.tt, plp, prompt.ids) if self.req.prompt_logprobs is not None else None,
        }

    # ------------------------------------------------------------------ streaming

    async def stream(self) -> AsyncIterator[bytes]:
        req = self.req
        streams, prompt_of = [], []
        for p_idx, prompt in enumerate(self.prompts):
            for i in range(req.n):
                streams.append(self.serving.engine.generate(
                    f"{self.engine_rid}-{p_idx}-{i}", prompt.ids, self.params(prompt, i),
                    priority=req.priority, cache_salt=req.cache_salt))
                prompt_of.append(p_idx)
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        completion_tokens = [0] * len(streams)
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        started: set[int] = set()
        echo_len = [0] * len(streams)
        async for idx, out in merge_streams(streams):
            raise_engine_error(out)
            completion_tokens[idx] = out.num_output_tokens
            text = out.text
            prompt = self.prompts[prompt_of[idx]]
            if req.echo and idx not in started:
                echo = self.echo_text(prompt)
                echo_len[idx] = len(echo)
                text = echo + text
            started.add(idx)
            if not text and not out.finished and not out.token_ids:
                continue
            logprobs = None
            if self.logprobs is not None and out.logprobs:
                logprobs = completion_logprobs(self.tt, out.logprobs, out.text_offsets or [],
                                               base_offset=echo_len[idx])
            chunk = {
                "id": self.rid,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": idx, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
                             "stop_reason": out.stop_reason}],
            }
            if include_usage and continuous:
                chunk["usage"] = usage_dict(prompt_tokens, sum(completion_tokens))
            yield sse(chunk)
        if include_usage:
            yield sse({"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [], "usage": usage_dict(prompt_tokens, sum(completion_tokens))})
        yield SSE_DONE


@post("/v1/completions", status_code=200)
async def create_completion(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), CompletionRequest)
    model = serving.check_model(req.model)
    serving.require_task("generate")
    req.validate_sampling(serving)
    if req.suffix is not None:
        raise bad_request("suffix is not supported.", param="suffix", code="unsupported_parameter")
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "cmpl")
    job = CompletionJob(serving, req, rid, engine_rid, model, await req.compile_constraint(serving))
    for prompt in job.prompts:  # builds every parameter once now, so bad values are a 400 before any stream
        serving.log_request(rid, len(prompt.ids), job.params(prompt, 0))
    if req.stream:
        return Stream(error_in_stream(job.stream()), media_type="text/event-stream",
                      headers={**SSE_HEADERS, **headers})
    body = await until_disconnect(request, job.collect())
    return Response(content=body, media_type="application/json", headers=headers)


@hookimpl
def register_routes(register):
    register(create_completion)
