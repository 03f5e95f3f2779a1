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
from patchbay_plugins.endpoints.tooling import (
    ChatTool,
    FunctionDefinition,
    ToolPlan,
    chat_tools,
    compile_output_constraint,
    function_tool,
    plan_tools,
    unique,
)
from patchbay_plugins.endpoints.toolstream import Piece, Turn, TurnReader


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
    tools: list[ChatTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: str | dict[str, Any] | None = None
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


def tool_plan(model: ServedModel, req: Any) -> ToolPlan:
    """The request's tools (or the deprecated ``functions`` / ``function_call``, as OpenAI maps them)."""
    if req.functions is None:
        if req.function_call is not None:
            raise bad_request("function_call needs functions.", param="function_call")
        return plan_tools(model, chat_tools(req.tools), req.tool_choice, req.parallel_tool_calls)
    if req.tools is not None or req.tool_choice is not None:
        raise bad_request("Send tools and tool_choice, or the deprecated functions and function_call, not both.",
                          param="functions")
    if not req.functions:
        raise bad_request("functions must not be empty; leave it out to offer none.", param="functions")
    tools = unique([function_tool(f.name, f.parameters, f.description, f.strict, f"functions[{i}]")
                    for i, f in enumerate(req.functions)], "functions")
    choice = req.function_call
    if isinstance(choice, dict):
        if set(choice) != {"name"}:
            raise bad_request('A named function_call is {"name": ...}.', param="function_call")
        choice = {"type": "function", "function": choice}
    elif choice == "required":
        raise bad_request("function_call is none, auto or {\"name\": ...}.", param="function_call")
    return plan_tools(model, tools, choice, False, param="function_call")


class Chat:
    """The chat wire format around a :class:`TextJob`: each choice read as a turn (reasoning, content, calls)."""

    def __init__(self, model: ServedModel, req: Any, job: TextJob, plan: ToolPlan):
        self.req, self.job, self.plan = req, job, plan
        self.model = model
        self.role = model.config.response_role
        #: the deprecated functions API answers with ``function_call``
        self.legacy = req.functions is not None
        #: top logprobs per token (None: no logprobs)
        self.k = job.logprobs
        last = req.messages[-1]
        self.echo = ""
        if req.echo and last.role == self.role:
            self.echo = "\n".join(parts_text(last, len(req.messages) - 1, skip_images=True) or [])
        self.readers: dict[int, TurnReader] = {}

    def reader(self, index: int) -> TurnReader:
        if index not in self.readers:
            self.readers[index] = TurnReader(self.model.reasoning_parser, self.plan if self.plan.mode != "none" else None)
        return self.readers[index]

    def finish_reason(self, turn_has_calls: bool, reason: str | None) -> str | None:
        if not turn_has_calls or reason != "stop":
            return reason
        if self.plan.mode == "named":
            return "stop"  # as OpenAI reports a call it was told to make
        return "function_call" if self.legacy else "tool_calls"

    def message(self, turn: Turn) -> dict[str, Any]:
        content = turn.content
        if self.echo:
            content = self.echo + (content or "")
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in turn.calls]
        message = {"role": self.role, "content": content, "refusal": None, "tool_calls": [] if self.legacy else calls,
                   "reasoning_content": turn.reasoning, "reasoning": turn.reasoning}
        if self.legacy and calls:
            message["function_call"] = calls[0]["function"]
        return message

    async def collect(self) -> dict[str, Any]:
        results = await self.job.collect()
        cands = results[0]
        tt = self.job.tt
        plp = next((c.prompt_logprobs for c in cands if c.prompt_logprobs is not None), None)
        choices = []
        for i, cand in enumerate(cands):
            reader = self.reader(i)
            reader.feed(cand.text)
            reader.finish()
            turn = reader.turn
            choices.append({
                "index": i,
                "message": self.message(turn),
                "logprobs": chat_logprobs(tt, cand.logprobs, self.k) if self.k is not None else None,
                "finish_reason": self.finish_reason(bool(turn.calls), cand.finish_reason),
                "stop_reason": cand.stop_reason,
            })
        prompt_lp = prompt_logprobs_json(tt, plp, self.job.prompts[0]) if self.req.prompt_logprobs is not None else None
        return self.job.response(choices, self.job.usage(results), prompt_logprobs=prompt_lp)

    def first(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": self.role, "content": self.echo}, "logprobs": None,
                "finish_reason": None, "stop_reason": None}

    def chunk(self, idx: int, _: int, out: RequestOutput) -> dict[str, Any] | None:
        reader = self.reader(idx)
        pieces = reader.feed(out.text)
        finish = None
        if out.finished:
            pieces += reader.finish()
            finish = self.finish_reason(bool(reader.turn.calls), out.finish_reason)
        if not pieces and not out.finished and not (self.k is not None and out.logprobs):
            return None
        logprobs = chat_logprobs(self.job.tt, out.logprobs or [], self.k) if self.k is not None else None
        return {"index": idx, "delta": self.delta(pieces), "logprobs": logprobs, "finish_reason": finish,
                "stop_reason": out.stop_reason}

    def delta(self, pieces: list[Piece]) -> dict[str, Any]:
        """One chunk's delta: reasoning and content text, and each call's opening (id, type, name) or more of
        its arguments, one entry per call index."""
        delta: dict[str, Any] = {}
        calls: dict[int, dict[str, Any]] = {}
        for p in pieces:
            if p.kind in ("reasoning", "content"):
                key = "reasoning_content" if p.kind == "reasoning" else "content"
                delta[key] = delta.get(key, "") + p.text
            elif p.kind == "call":
                calls[p.index] = {"index": p.index, "id": p.id, "type": "function",
                                  "function": {"name": p.name, "arguments": ""}}
            else:
                entry = calls.setdefault(p.index, {"index": p.index, "function": {"arguments": ""}})
                entry["function"]["arguments"] += p.text
        if "reasoning_content" in delta:
            delta["reasoning"] = delta["reasoning_content"]
        if calls and self.legacy:
            delta["function_call"] = calls[0]["function"]
        elif calls:
            delta["tool_calls"] = list(calls.values())
        return delta


@post("/v1/chat/completions", status_code=200, opt={"body": ChatCompletionRequest})
async def create_chat_completion(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), ChatCompletionRequest)
    model, name = serving.resolve(req.model)
    model.require_task("generate")
    req.validate_sampling(model)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, "chatcmpl")
    validate_chat(model, req)
    plan = tool_plan(model, req)
    if plan.mode != "none" and getattr(plan.reader, "keep_special_tokens", False):
        req.skip_special_tokens = False  # the parser's markup is a special token
    ids, mm = await render_chat(model, req, lambda ids: req.truncate(ids, model), plan.render)
    model.check_length(len(ids), "messages")
    job = TextJob(model, req, [ids], rid=rid, engine_rid=engine_rid, name=name, mm=[mm],
                  obj="chat.completion.chunk" if req.stream else "chat.completion",
                  max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
                  default_max_tokens=None, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    params = job.prepare(await compile_output_constraint(model, req, plan))
    serving.log_request(rid, len(ids), params[0])
    api = Chat(model, req, job, plan)
    if req.stream:
        return Stream(error_in_stream(job.stream(api.chunk, api.first)), media_type="text/event-stream",
                      headers={**SSE_HEADERS, **headers})
    body = await until_disconnect(request, api.collect())
    return Response(content=body, media_type="application/json", headers=headers)


@hookimpl
def register_routes(register):
    register(create_chat_completion)
