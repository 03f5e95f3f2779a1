"""POST /v1/completions — OpenAI's (legacy) text completions, with vLLM's extra parameters."""

from __future__ import annotations

from typing import Any

import attrs
from litestar import Request, Response, post
from litestar.response import Stream

from patchbay import hookimpl
from patchbay.engine.params import RequestOutput
from patchbay.errors import bad_request
from patchbay.protocol import parse_body
from patchbay.served import ServedModel
from patchbay.serving import ServingDep
from patchbay_plugins.endpoints.generation import Candidate
from patchbay_plugins.endpoints.logprobs import completion_logprobs, next_offset, prompt_logprobs_json
from patchbay_plugins.endpoints.streaming import SSE_HEADERS, error_in_stream, until_disconnect
from patchbay_plugins.endpoints.textgen import NOT_YET_COMMON, SamplingFields, with_pending_fields
from patchbay_plugins.endpoints.textjob import TextJob

Prompt = str | list[str] | list[int] | list[list[int]]

#: completions' default max_tokens, as OpenAI and vLLM have it
DEFAULT_MAX_TOKENS = 16


@attrs.define(kw_only=True)
class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None

    def least_max_tokens(self) -> int:
        """``max_tokens: 0`` with ``echo`` scores the prompt (its logprobs, no new token), as OpenAI's
        legacy API and vLLM allow."""
        return 0 if self.echo else 1


CompletionRequest = with_pending_fields(CompletionRequest, NOT_YET_COMMON)


@attrs.define
class PromptInput:
    ids: list[int]
    #: the prompt's own text (for echo), when it was given as text and not truncated
    text: str | None


def _prompts(model: ServedModel, req: Any) -> list[PromptInput]:
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
            ids = model.encode(item, add_special_tokens=add_special)
        else:
            ids = list(item)
            model.check_prompt_ids(ids, param)
        truncated = req.truncate(ids, model)
        model.check_length(len(truncated), param)
        text = item if isinstance(item, str) and truncated is ids else None
        out.append(PromptInput(truncated, text))
    return out


class Completions:
    """The completions wire format around a :class:`TextJob`."""

    def __init__(self, model: ServedModel, req: Any, prompts: list[PromptInput], job: TextJob):
        self.model, self.req, self.prompts, self.job = model, req, prompts, job
        #: choice index -> where its running text_offset count stands (streaming); absent: nothing sent yet
        self.offset: dict[int, int] = {}

    def echo_text(self, prompt: PromptInput) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.model.tokenizer.decode(prompt.ids, skip_special_tokens=self.req.skip_special_tokens)

    def choice(self, index: int, prompt: PromptInput, cand: Candidate, plp: Any) -> dict[str, Any]:
        req, tt = self.req, self.job.tt
        text = cand.text
        if req.echo:
            text = self.echo_text(prompt) + text
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(tt, cand.logprobs, prompt=plp if req.echo else None, prompt_ids=prompt.ids)
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": cand.finish_reason,
            "stop_reason": cand.stop_reason,
            "prompt_logprobs": prompt_logprobs_json(tt, plp, prompt.ids) if req.prompt_logprobs is not None else None,
        }

    async def collect(self) -> dict[str, Any]:
        results = await self.job.collect()
        choices = []
        for p_idx, (prompt, cands) in enumerate(zip(self.prompts, results)):
            plp = next((c.prompt_logprobs for c in cands if c.prompt_logprobs is not None), None)
            for i, cand in enumerate(cands):
                choices.append(self.choice(p_idx * self.req.n + i, prompt, cand, plp))
        return self.job.response(choices, self.job.usage(results))

    def chunk(self, idx: int, p_idx: int, out: RequestOutput) -> dict[str, Any] | None:
        text, first = out.text, idx not in self.offset
        prompt = self.prompts[p_idx]
        if self.req.echo and first:
            text = self.echo_text(prompt) + text
        start = self.offset.setdefault(idx, 0)
        if not text and not out.finished and not out.token_ids:
            return None
        logprobs = None
        echo_lp = self.req.echo and first and out.prompt_logprobs is not None
        if self.req.logprobs is not None and (out.logprobs or echo_lp):
            logprobs = completion_logprobs(self.job.tt, out.logprobs or [], start=start,
                                           prompt=out.prompt_logprobs if echo_lp else None, prompt_ids=prompt.ids)
            self.offset[idx] = next_offset(logprobs, start)
        return {"index": idx, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}


@post("/v1/completions", status_code=200, opt={"body": CompletionRequest})
async def create_completion(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), CompletionRequest)
    model, name = serving.resolve(req.model)
    model.require_task("generate")
    req.validate_sampling(model)
    if req.suffix is not None:
        raise bad_request("suffix is not supported.", param="suffix", code="unsupported_parameter")
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "cmpl")
    constraint = await req.compile_constraint(model)
    prompts = _prompts(model, req)
    job = TextJob(model, req, [p.ids for p in prompts], rid=rid, engine_rid=engine_rid, name=name,
                  obj="text_completion", max_tokens=req.max_tokens, default_max_tokens=DEFAULT_MAX_TOKENS,
                  logprobs=req.logprobs, prompt_logprobs=req.logprobs if req.echo else None)
    if req.logprobs is not None:
        req._check_logprob_count(model, "logprobs", req.logprobs)
    for prompt, params in zip(prompts, job.prepare(constraint)):  # every parameter is checked before any stream
        serving.log_request(rid, len(prompt.ids), params)
    api = Completions(model, req, prompts, job)
    if req.stream:
        return Stream(error_in_stream(job.stream(api.chunk)), media_type="text/event-stream",
                      headers={**SSE_HEADERS, **headers})
    body = await until_disconnect(request, api.collect())
    return Response(content=body, media_type="application/json", headers=headers)


@hookimpl
def register_routes(register):
    register(create_completion)
