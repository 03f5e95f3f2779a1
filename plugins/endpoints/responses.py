"""OpenAI's Responses API (plugin ``responses``).

- ``POST /v1/responses``: a response to ``input`` (plus ``instructions``, ``tools``, ``text.format``, ...),
  whole or streamed as the events the ``openai`` client expects; ``store`` (default true) keeps it,
  ``previous_response_id`` continues a stored one, ``background`` runs it detached;
- ``GET /v1/responses/{id}`` (``?stream=true&starting_after=N`` follows a background one's events),
  ``DELETE /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``, ``GET /v1/responses/{id}/input_items``.

The request becomes a chat request (the chat template over the input items) run through the same
machinery as ``/v1/chat/completions``: tools, tool parsers, reasoning parsers, structured outputs.
"""

from __future__ import annotations

import re
import time
from typing import Any, AsyncIterator

import attrs
import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from patchbay import hookimpl
from patchbay.errors import APIError, bad_request
from patchbay.protocol import parse_body
from patchbay.serving import Serving, ServingDep
from patchbay_plugins.endpoints.chat import ChatCompletionRequest
from patchbay_plugins.endpoints.chatprompt import ChatMessage, render_chat
from patchbay_plugins.endpoints.responses_output import new_id
from patchbay_plugins.endpoints.responses_run import ResponseRun, ResponsesService
from patchbay_plugins.endpoints.responses_types import (
    ResponsesRequest,
    input_items,
    response_tools,
    to_messages,
)
from patchbay_plugins.endpoints.streaming import SSE_HEADERS, until_disconnect
from patchbay_plugins.endpoints.textgen import JsonSchemaFormat, ResponseFormat
from patchbay_plugins.endpoints.textjob import TextJob
from patchbay_plugins.endpoints.tooling import compile_output_constraint, plan_tools

#: the chat request's field names as the Responses API names them (for the ``param`` of errors)
PARAMS = {"max_completion_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format",
          "top_logprobs": "top_logprobs"}


def service(serving: Serving) -> ResponsesService:
    return serving.state("responses", ResponsesService)


def _renamed(exc: APIError, sources: list[int] | None = None) -> APIError:
    """``exc`` with the chat request's field names as the Responses request names them; ``sources``: the input
    item of each chat message (``messages[2].content[1]`` -> ``input[1].content[1]``; an item of the previous
    response's conversation -> ``previous_response_id``)."""
    if exc.param:
        head, dot, rest = exc.param.partition(".")
        match = re.fullmatch(r"messages\[(\d+)\]", head)
        if match and sources is not None and int(match.group(1)) < len(sources):
            source = sources[int(match.group(1))]
            new = f"input[{source}]{dot}{rest}" if source >= 0 else "previous_response_id"
            exc.message, exc.param = exc.message.replace(exc.param, new), new
        elif head in PARAMS:
            exc.param = PARAMS[head] + dot + rest
        elif exc.param.startswith("response_format"):
            exc.param = "text.format" + exc.param[len("response_format"):]
    return exc


def response_format(req: Any) -> ResponseFormat | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.type == "json_schema":
        if not isinstance(fmt.schema, dict):
            raise bad_request("text.format json_schema needs its schema.", param="text.format.schema")
        return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
            name=fmt.name, description=fmt.description, schema=fmt.schema, strict=fmt.strict))
    raise bad_request(f"text.format type {fmt.type!r} is not supported; use text, json_object or json_schema.",
                      param="text.format.type")


def chat_request(req: Any, messages: list[ChatMessage]) -> Any:
    """The chat request a Responses request runs as."""
    effort = req.reasoning.effort if req.reasoning is not None else None
    return ChatCompletionRequest(
        messages=messages, model=req.model, max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
        logit_bias=req.logit_bias, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output, vllm_xargs=req.vllm_xargs,
        logits_processors=req.logits_processors, structured_outputs=req.structured_outputs,
        response_format=response_format(req), request_id=req.request_id, priority=req.priority,
        cache_salt=req.cache_salt, logprobs=req.logprobs, top_logprobs=req.top_logprobs if req.logprobs else None,
        chat_template_kwargs={"reasoning_effort": effort} if effort else None, user=req.user)


def stored_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as they are stored and listed: each with an id, message content as parts."""
    out = []
    for item in items:
        item = dict(item)
        kind = item.setdefault("type", "message")
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        item.setdefault("id", new_id({"message": "msg", "function_call": "fc", "reasoning": "rs"}.get(kind, "fco")))
        out.append(item)
    return out


async def fit(model: Any, creq: Any, plan: Any, truncate: bool, sources: list[int]) -> tuple[list[int], Any]:
    """The prompt and its images; with ``truncation: auto`` the oldest turns (not the system message) go until
    it fits (their entries of ``sources`` with them; each image is fetched once)."""
    known: dict[str, Any] = {}
    while True:
        ids, mm = await render_chat(model, creq, tools=plan.render, known=known)
        if not truncate or len(ids) < model.max_model_len:
            return ids, mm
        drop = next((i for i, m in enumerate(creq.messages) if m.role != "system"), None)
        if drop is None or len(creq.messages) - drop <= 1:
            return ids, mm
        creq.messages = creq.messages[:drop] + creq.messages[drop + 1:]
        del sources[drop]


def response_head(req: Any, rid: str, name: str, params: Any) -> dict[str, Any]:
    """The response object before its output: the request's settings echoed (sampling ones as applied)."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": bool(req.background), "completed_at": None, "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls, "metadata": req.metadata or {}, "model": name, "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": req.previous_response_id,
        "prompt_cache_key": req.prompt_cache_key, "safety_identifier": req.safety_identifier,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
        "service_tier": "default", "store": req.stored, "temperature": params.temperature,
        "text": {"format": {k: v for k, v in attrs.asdict(fmt).items() if v is not None} if fmt else {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": req.tools or [],
        "top_logprobs": req.top_logprobs or 0, "top_p": params.top_p, "truncation": req.truncation or "disabled",
        "usage": None, "user": req.user,
    }


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"


def sse_error(exc: APIError, sequence_number: int) -> bytes:
    return sse({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param,
                "sequence_number": sequence_number})


async def numbered(events: AsyncIterator[dict[str, Any]], on_final: Any) -> AsyncIterator[bytes]:
    """SSE of ``events`` with strictly increasing sequence numbers; ``on_final(response)`` at the end."""
    n = 0
    try:
        async for event in events:
            yield sse({**event, "sequence_number": n})
            n += 1
            if event["type"] in ("response.completed", "response.incomplete", "response.failed"):
                on_final(event["response"])
    except APIError as exc:
        yield sse_error(exc, n)


# --------------------------------------------------------------------------- routes


@post("/v1/responses", status_code=200, opt={"body": ResponsesRequest})
async def create_response(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), ResponsesRequest)
    req.check()
    model, name = serving.resolve(req.model)
    model.require_task("generate")
    responses = service(serving)
    earlier = responses.conversation(req.previous_response_id, "previous_response_id") \
        if req.previous_response_id else []
    own = input_items(req.input)
    sources = [-1] if req.instructions else []  # each chat message's input item (negative: not in input)
    messages = ([ChatMessage(role="system", content=req.instructions)] if req.instructions else []) \
        + to_messages(earlier, offset=-len(earlier), sources=sources) + to_messages(own, sources=sources)
    rid = new_id("resp")
    try:
        creq = chat_request(req, messages)
        creq.validate_sampling(model)
        plan = plan_tools(model, response_tools(req.tools), req.tool_choice, req.parallel_tool_calls, flat=True,
                          max_calls=req.max_tool_calls)
        if plan.mode != "none" and getattr(plan.reader, "keep_special_tokens", False):
            creq.skip_special_tokens = False
        ids, mm = await fit(model, creq, plan, req.truncation == "auto", sources)
        model.check_length(len(ids), "input")
        _, engine_rid, headers = serving.request_ids(request, req.request_id, "resp")
        job = TextJob(model, creq, [ids], rid=rid, engine_rid=engine_rid, name=name, obj="response", mm=[mm],
                      max_tokens=req.max_output_tokens, default_max_tokens=None,
                      logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        params = job.prepare(await compile_output_constraint(model, creq, plan))
    except APIError as exc:
        raise _renamed(exc, sources) from None
    serving.log_request(rid, len(ids), params[0])
    run = ResponseRun(model, job, plan, response_head(req, rid, name, params[0]), logprobs=job.logprobs)
    items = stored_items([*earlier, *own])
    if req.background:
        bg = responses.start(run, items)
        if req.stream:
            return Stream(numbered(_logged(bg.follow()), lambda _: None), media_type="text/event-stream",
                          headers={**SSE_HEADERS, **headers})
        return Response(content=run.snapshot(status="queued"), media_type="application/json", headers=headers)
    if req.stream:
        return Stream(numbered(run.events(), lambda final: responses.save(final, items)),
                      media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    async def whole() -> dict[str, Any]:
        final = None
        async for event in run.events():
            final = event.get("response", final)
        return final

    final = await until_disconnect(request, whole())
    responses.save(final, items)
    if final["status"] == "failed":
        raise APIError(final["error"]["message"], status=500, type="server_error")
    return Response(content=final, media_type="application/json", headers=headers)


async def _logged(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """A background job's logged events without their numbers (:func:`numbered` numbers them again, the same)."""
    async for event in events:
        yield {k: v for k, v in event.items() if k != "sequence_number"}


def _found(responses: ResponsesService, response_id: str) -> dict[str, Any]:
    found = responses.get(response_id)
    if found is None:
        raise APIError(f"No stored response has the id {response_id!r}.", status=404, param="response_id",
                       code="response_not_found")
    return found


@get("/v1/responses/{response_id:str}")
async def retrieve_response(response_id: FromPath[str], serving: ServingDep, stream: FromQuery[bool] = False,
                            starting_after: FromQuery[int | None] = None) -> Response:
    responses = service(serving)
    found = _found(responses, response_id)
    if not stream:
        return Response(content=found, media_type="application/json")
    job = responses.job(response_id)
    if job is None:
        raise bad_request("Only a background response's events can be followed, while the server holds them.",
                          param="stream")

    async def replay() -> AsyncIterator[bytes]:
        async for event in job.follow(-1 if starting_after is None else starting_after):
            yield sse(event)

    return Stream(replay(), media_type="text/event-stream", headers=SSE_HEADERS)


@delete("/v1/responses/{response_id:str}", status_code=200)
async def delete_response(response_id: FromPath[str], serving: ServingDep) -> dict[str, Any]:
    if not service(serving).delete(response_id):
        raise APIError(f"No stored response has the id {response_id!r}.", status=404, param="response_id",
                       code="response_not_found")
    return {"id": response_id, "object": "response", "deleted": True}


@attrs.define
class NoBody:
    """``POST /v1/responses/{id}/cancel`` takes no body."""


@post("/v1/responses/{response_id:str}/cancel", status_code=200, opt={"body": NoBody})
async def cancel_response(response_id: FromPath[str], serving: ServingDep) -> dict[str, Any]:
    responses = service(serving)
    found = _found(responses, response_id)
    if not found.get("background"):
        raise bad_request("Only background responses can be cancelled.", param="response_id")
    return responses.cancel(response_id) or found


@get("/v1/responses/{response_id:str}/input_items")
async def list_input_items(response_id: FromPath[str], serving: ServingDep, limit: FromQuery[int] = 20,
                           order: FromQuery[str] = "desc", after: FromQuery[str | None] = None,
                           before: FromQuery[str | None] = None) -> dict[str, Any]:
    responses = service(serving)
    _found(responses, response_id)
    entry = responses.store.get(response_id)
    items = list(entry["input"]) if entry is not None else []
    if not 1 <= limit <= 100:
        raise bad_request("limit must be between 1 and 100.", param="limit")
    if order not in ("asc", "desc"):
        raise bad_request("order is asc or desc.", param="order")
    if order == "desc":
        items.reverse()
    ids = [item["id"] for item in items]
    for cursor, param, keep in ((after, "after", lambda i: items[i + 1:]), (before, "before", lambda i: items[:i])):
        if cursor is not None:
            if cursor not in ids:
                raise bad_request(f"No input item has the id {cursor!r}.", param=param)
            items = keep(ids.index(cursor))
            ids = [item["id"] for item in items]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


@hookimpl
def register_routes(register):
    for handler in (create_response, retrieve_response, delete_response, cancel_response, list_input_items):
        register(handler)
