"""POST /v1/chat/completions — OpenAI's chat completions, with vLLM's extra parameters."""

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
from patchbay_plugins.endpoints.chatprompt import ChatMessage, parts_text, render_chat
from patchbay_plugins.endpoints.logprobs import chat_logprobs, prompt_logprobs_json
from patchbay_plugins.endpoints.streaming import SSE_HEADERS, error_in_stream, until_disconnect
from patchbay_plugins.endpoints.textgen import NOT_YET_CHAT, NOT_YET_COMMON, SamplingFields, with_pending_fields
from patchbay_plugins.endpoints.textjob import TextJob


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


def validate_chat(model: ServedModel, req: Any) -> None:
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise bad_request(f"max_completion_tokens must be at least 1 (got {req.max_completion_tokens}).",
                          param="max_completion_tokens")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")
        req._check_logprob_count(model, "top_logprobs", req.top_logprobs)
    if req.modalities not in (None, ["text"]):
        raise bad_request("Only the text modality is offered.", param="modalities")


class Chat:
    """The chat wire format around a :class:`TextJob`."""

    def __init__(self, model: ServedModel, req: Any, job: TextJob):
        self.req, self.job = req, job
        self.role = model.config.response_role
        #: top logprobs per token (None: no logprobs)
        self.k = job.logprobs
        last = req.messages[-1]
        self.echo = ""
        if req.echo and last.role == self.role:
            self.echo = "\n".join(parts_text(last, len(req.messages) - 1, skip_images=True) or [])

    async def collect(self) -> dict[str, Any]:
        results = await self.job.collect()
        cands = results[0]
        tt = self.job.tt
        plp = next((c.prompt_logprobs for c in cands if c.prompt_logprobs is not None), None)
        choices = [{
            "index": i,
            "message": {"role": self.role, "content": self.echo + cand.text, "refusal": None, "tool_calls": [],
                        "reasoning_content": None},
            "logprobs": chat_logprobs(tt, cand.logprobs, self.k) if self.k is not None else None,
            "finish_reason": cand.finish_reason,
            "stop_reason": cand.stop_reason,
        } for i, cand in enumerate(cands)]
        prompt_lp = prompt_logprobs_json(tt, plp, self.job.prompts[0]) if self.req.prompt_logprobs is not None else None
        return self.job.response(choices, self.job.usage(results), prompt_logprobs=prompt_lp)

    def first(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": self.role, "content": self.echo}, "logprobs": None,
                "finish_reason": None, "stop_reason": None}

    def chunk(self, idx: int, _: int, out: RequestOutput) -> dict[str, Any] | None:
        if not out.text and not out.finished and not (self.k is not None and out.logprobs):
            return None
        logprobs = chat_logprobs(self.job.tt, out.logprobs or [], self.k) if self.k is not None else None
        return {"index": idx, "delta": {"content": out.text} if out.text else {}, "logprobs": logprobs,
                "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}


@post("/v1/chat/completions", status_code=200, opt={"body": ChatCompletionRequest})
async def create_chat_completion(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), ChatCompletionRequest)
    model, name = serving.resolve(req.model)
    model.require_task("generate")
    req.validate_sampling(model)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "chatcmpl")
    validate_chat(model, req)
    ids, mm = await render_chat(model, req, lambda ids: req.truncate(ids, model))
    model.check_length(len(ids), "messages")
    job = TextJob(model, req, [ids], rid=rid, engine_rid=engine_rid, name=name, mm=[mm],
                  obj="chat.completion.chunk" if req.stream else "chat.completion",
                  max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
                  default_max_tokens=None, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    params = job.prepare(await req.compile_constraint(model))
    serving.log_request(rid, len(ids), params[0])
    api = Chat(model, req, job)
    if req.stream:
        return Stream(error_in_stream(job.stream(api.chunk, api.first)), media_type="text/event-stream",
                      headers={**SSE_HEADERS, **headers})
    body = await until_disconnect(request, api.collect())
    return Response(content=body, media_type="application/json", headers=headers)


@hookimpl
def register_routes(register):
    register(create_chat_completion)
