"""POST /v1/chat/completions — OpenAI's chat completions."""

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
    NOT_YET_CHAT,
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

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@attrs.define(kw_only=True)
class ContentPart:
    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    video_url: Any = None
    file: Any = None
    refusal: str | None = None


@attrs.define(kw_only=True)
class ChatMessage:
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None


@attrs.define(kw_only=True)
class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True


ChatCompletionRequest = with_pending_fields(ChatCompletionRequest, NOT_YET_COMMON, NOT_YET_CHAT)


def _text_of(message: ChatMessage, index: int) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type in ("text", "input_text", "output_text", "refusal"):
            text = part.text if part.type != "refusal" else part.refusal
            if text is None:
                raise bad_request(f"A '{part.type}' content part needs its text.", param=f"messages[{index}].content[{j}]")
            texts.append(text)
        else:
            raise bad_request(
                f"Content parts of type '{part.type}' are not supported: the served model takes text only.",
                param=f"messages[{index}].content[{j}].type",
            )
    return "\n".join(texts)


def render_messages(serving: Serving, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    if not messages:
        raise bad_request("messages must not be empty.", param="messages")
    plain = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise bad_request(
                f"Unknown role {m.role!r} in messages[{i}]; expected one of: {', '.join(ROLES)}.",
                param=f"messages[{i}].role",
            )
        entry: dict[str, Any] = {"role": m.role, "content": _text_of(m, i)}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                entry[key] = getattr(m, key)
        plain.append(entry)
    prompt = serving.chat_template.render(plain, add_generation_prompt=add_generation_prompt)
    return serving.encode(prompt, add_special_tokens=False)


def _chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any], finish: str | None,
           stop_reason: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish,
                     "stop_reason": stop_reason}],
    }


def _streams(serving: Serving, req: Any, rid: str, ids: list[int], params) -> list[AsyncIterator]:
    return [serving.engine.generate(f"{rid}-{i}", ids, child_params(params, i)) for i in range(req.n)]


async def _stream(serving: Serving, req: Any, rid: str, model: str, ids: list[int], params) -> AsyncIterator[bytes]:
    created = now()
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    prompt_tokens = len(ids)
    completion_tokens = [0] * req.n

    def usage() -> dict[str, Any]:
        return usage_dict(prompt_tokens, sum(completion_tokens))

    for i in range(req.n):
        first = _chunk(rid, created, model, i, {"role": "assistant", "content": ""}, None, None)
        if include_usage and continuous:
            first["usage"] = usage()
        yield sse(first)
    async for idx, out in merge_streams(_streams(serving, req, rid, ids, params)):
        raise_engine_error(out)
        completion_tokens[idx] = out.num_output_tokens
        if not out.text and not out.finished:
            continue
        delta = {"content": out.text} if out.text else {}
        chunk = _chunk(rid, created, model, idx, delta, out.finish_reason, out.stop_reason)
        if include_usage and continuous:
            chunk["usage"] = usage()
        yield sse(chunk)
    if include_usage:
        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": usage()})
    yield SSE_DONE


async def _collect(serving: Serving, req: Any, rid: str, model: str, ids: list[int], params) -> dict[str, Any]:
    texts = [""] * req.n
    last: list[Any] = [None] * req.n
    async for idx, out in merge_streams(_streams(serving, req, rid, ids, params)):
        raise_engine_error(out)
        texts[idx] += out.text
        last[idx] = out
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i], "refusal": None, "tool_calls": [],
                        "reasoning_content": None},
            "logprobs": None,
            "finish_reason": out.finish_reason,
            "stop_reason": out.stop_reason,
        }
        for i, out in enumerate(last)
    ]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage_dict(len(ids), sum(o.num_output_tokens for o in last), last[0].num_cached_tokens),
        "system_fingerprint": None,
        "prompt_logprobs": None,
    }


@post("/v1/chat/completions", status_code=200)
async def create_chat_completion(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), ChatCompletionRequest)
    model = serving.check_model(req.model)
    serving.require_task("generate")
    req.validate_sampling()
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise bad_request(
            f"max_completion_tokens must be at least 1 (got {req.max_completion_tokens}).",
            param="max_completion_tokens",
        )
    ids = render_messages(serving, req.messages, req.add_generation_prompt)
    serving.check_length(len(ids), "messages")
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = req.sampling_params(serving.output_budget(len(ids), requested, None), len(serving.tokenizer))
    rid = random_id("chatcmpl")
    serving.log_request(rid, len(ids), params)
    if req.stream:
        gen = error_in_stream(_stream(serving, req, rid, model, ids, params), lambda exc: sse(exc.body()))
        return Stream(gen, media_type="text/event-stream", headers=SSE_HEADERS)
    body = await until_disconnect(request, _collect(serving, req, rid, model, ids, params))
    return Response(content=body, media_type="application/json")


@hookimpl
def register_routes(register):
    register(create_chat_completion)
