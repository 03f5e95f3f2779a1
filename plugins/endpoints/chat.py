"""POST /v1/chat/completions — OpenAI's chat completions, with vLLM's extra parameters."""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

import attrs
from litestar import Request, Response, post
from litestar.response import Stream

from patchbay import hookimpl
from patchbay.errors import bad_request
from patchbay.protocol import parse_body
from patchbay.serving import Serving, ServingDep
from patchbay_plugins.endpoints.chatprompt import ChatMessage, parts_text, render_messages
from patchbay_plugins.endpoints.generation import Candidate, beam_search, best_n, run_candidates
from patchbay_plugins.endpoints.logprobs import TokenText, chat_logprobs, prompt_logprobs_json
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
    NOT_YET_CHAT,
    NOT_YET_COMMON,
    SamplingFields,
    child_params,
    instantiate_processors,
    now,
    usage_dict,
    with_pending_fields,
)

log = logging.getLogger("patchbay.chat")

@attrs.define(kw_only=True)
class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


ChatCompletionRequest = with_pending_fields(ChatCompletionRequest, NOT_YET_COMMON, NOT_YET_CHAT)


# --------------------------------------------------------------------------- running


class ChatJob:
    def __init__(self, serving: Serving, req: Any, rid: str, engine_rid: str, model: str, constraint: Any = None):
        self.serving, self.req, self.rid, self.engine_rid, self.model = serving, req, rid, engine_rid, model
        self.constraint = constraint
        self.role = serving.config.response_role
        if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
            raise bad_request(f"max_completion_tokens must be at least 1 (got {req.max_completion_tokens}).",
                              param="max_completion_tokens")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")
            req._check_logprob_count(serving, "top_logprobs", req.top_logprobs)
        if req.modalities not in (None, ["text"]):
            raise bad_request("Only the text modality is offered.", param="modalities")
        self.ids = req.truncate(render_messages(serving, req), serving)
        serving.check_length(len(self.ids), "messages")
        self.tt = TokenText(serving, bool(req.return_tokens_as_token_ids))
        self.k = (req.top_logprobs or 0) if req.logprobs else None
        self.refs = req.processors(serving)
        self.count = req.best_of or req.n
        self.created = now()
        last = req.messages[-1]
        self.echo = ""
        if req.echo and last.role == self.role:
            self.echo = "\n".join(parts_text(last, len(req.messages) - 1) or [])

    def params(self, index: int):
        req = self.req
        logprobs = self.k
        if logprobs is None and self.count > req.n:
            logprobs = 0
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(self.serving, num_prompt_tokens=len(self.ids), default_max_tokens=None,
                                     logprobs=logprobs, max_tokens_override=requested)
        params.constraint = self.constraint
        params = child_params(params, index)
        if self.refs:
            params = attrs.evolve(params, logits_processors=instantiate_processors(self.refs, self.serving,
                                                                                   req.vllm_xargs))
        return params

    async def candidates(self) -> list[Candidate]:
        req = self.req
        if req.use_beam_search:
            return await beam_search(self.serving, self.engine_rid, self.ids, self.params(0), req.n,
                                     length_penalty=req.length_penalty, early_stopping=req.early_stopping,
                                     priority=req.priority, cache_salt=req.cache_salt)
        cands = await run_candidates(self.serving, self.engine_rid, self.ids, self.params, self.count,
                                     priority=req.priority, cache_salt=req.cache_salt)
        return best_n(cands, req.n)

    async def collect(self) -> dict[str, Any]:
        cands = await self.candidates()
        plp = next((c.prompt_logprobs for c in cands if c.prompt_logprobs is not None), None)
        choices = []
        for i, cand in enumerate(cands):
            choices.append({
                "index": i,
                "message": {"role": self.role, "content": self.echo + cand.text, "refusal": None, "tool_calls": [],
                            "reasoning_content": None},
                "logprobs": chat_logprobs(self.tt, cand.logprobs, self.k) if self.k is not None else None,
                "finish_reason": cand.finish_reason,
                "stop_reason": cand.stop_reason,
            })
        completion = sum(c.num_output_tokens for c in cands)
        return {
            "id": self.rid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_dict(len(self.ids), completion, max((c.num_cached_tokens for c in cands), default=0)),
            "system_fingerprint": None,
            "prompt_logprobs": prompt_logprobs_json(self.tt, plp, self.ids) if self.req.prompt_logprobs is not None else None,
        }

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None, stop_reason: Any,
               logprobs: Any = None) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                         "stop_reason": stop_reason}],
        }

    async def stream(self) -> AsyncIterator[bytes]:
        req = self.req
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        completion_tokens = [0] * req.n

        def usage() -> dict[str, Any]:
            return usage_dict(len(self.ids), sum(completion_tokens))

        streams = [
            self.serving.engine.generate(f"{self.engine_rid}-{i}", self.ids, self.params(i), priority=req.priority,
                                         cache_salt=req.cache_salt)
            for i in range(req.n)
        ]
        for i in range(req.n):
            first = self._chunk(i, {"role": self.role, "content": self.echo}, None, None)
            if include_usage and continuous:
                first["usage"] = usage()
            yield sse(first)
        async for idx, out in merge_streams(streams):
            raise_engine_error(out)
            completion_tokens[idx] = out.num_output_tokens
            if not out.text and not out.finished and not (self.k is not None and out.logprobs):
                continue
            delta = {"content": out.text} if out.text else {}
            logprobs = chat_logprobs(self.tt, out.logprobs or [], self.k) if self.k is not None else None
            chunk = self._chunk(idx, delta, out.finish_reason, out.stop_reason, logprobs)
            if include_usage and continuous:
                chunk["usage"] = usage()
            yield sse(chunk)
        if include_usage:
            yield sse({"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [], "usage": usage()})
        yield SSE_DONE


@post("/v1/chat/completions", status_code=200)
async def create_chat_completion(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), ChatCompletionRequest)
    model = serving.check_model(req.model)
    serving.require_task("generate")
    req.validate_sampling(serving)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "chatcmpl")
    job = ChatJob(serving, req, rid, engine_rid, model)
    job.constraint = await req.compile_constraint(serving)
    serving.log_request(rid, len(job.ids), job.params(0))  # also validates every parameter before streaming
    if req.stream:
        return Stream(error_in_stream(job.stream()), media_type="text/event-stream",
                      headers={**SSE_HEADERS, **headers})
    body = await until_disconnect(request, job.collect())
    return Response(content=body, media_type="application/json", headers=headers)


@hookimpl
def register_routes(register):
    register(create_chat_completion)
