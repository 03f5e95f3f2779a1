"""The Responses API's request, checked, and its input items turned into the chat messages the template renders.

Input items: messages (roles ``user`` / ``assistant`` / ``system`` / ``developer``; content a string or
``input_text`` / ``output_text`` parts, and ``input_image`` parts — ``image_url`` an https, http or data: URL —
that become chat's ``image_url`` parts), ``function_call`` and ``function_call_output`` items, and
``reasoning`` items (their text goes to the next assistant turn as ``reasoning_content``). A response's
own output items are valid input, so a stored conversation continues exactly as if it had been sent
again. Not a plugin itself.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from patchbay.errors import APIError, bad_request
from patchbay.protocol import structure
from patchbay.tools import FunctionTool
from patchbay_plugins.endpoints.chatprompt import IMAGE_PART, ChatMessage, ContentPart
from patchbay_plugins.endpoints.textgen import (
    ProcessorRef,
    StructuredOutputsParams,
    check_not_yet,
    with_pending_fields,
)
from patchbay_plugins.endpoints.tooling import function_tool, unique

#: include values this server honours
INCLUDE = ("message.output_text.logprobs",)
#: OpenAI request fields this server does not do, accepted only with these neutral values
NOT_SUPPORTED: dict[str, tuple[Any, ...]] = {
    "conversation": (None,),
    "prompt": (None,),
    "context_management": (None, []),
    "background_options": (None,),
    "moderation": (None,),
    "image": (None,),
    "access_programs": (None,),
    "prompt_cache_options": (None,),
    "previous_input_messages": (None,),
    "previous_response": (None,),
    "mm_processor_kwargs": (None, {}),
    "enable_response_messages": (None, False),
}


@attrs.define(kw_only=True)
class TextFormat:
    type: str = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


@attrs.define(kw_only=True)
class TextConfig:
    format: TextFormat | None = None
    verbosity: str | None = None


@attrs.define(kw_only=True)
class ReasoningConfig:
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


@attrs.define(kw_only=True)
class ResponsesRequest:
    """``POST /v1/responses``: OpenAI's fields, then vLLM's extras."""

    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    truncation: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    # vLLM's extras
    request_id: str | None = None
    priority: int = 0
    cache_salt: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    vllm_xargs: dict[str, Any] | None = None
    logits_processors: list[str | ProcessorRef] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def check(self) -> None:
        """What the field types do not say. Raises a 400 naming the field."""
        check_not_yet(self)
        if self.input is None:
            raise bad_request("input is required.", param="input")
        if isinstance(self.input, list) and not self.input and self.previous_response_id is None:
            raise bad_request("input must not be empty.", param="input")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise bad_request(f"max_output_tokens must be at least 1 (got {self.max_output_tokens}).",
                              param="max_output_tokens")
        if self.max_tool_calls is not None and self.max_tool_calls < 1:
            raise bad_request("max_tool_calls must be at least 1.", param="max_tool_calls")
        if self.background and self.store is False:
            raise bad_request("background needs store: true (a background response is fetched from the store).",
                              param="background")
        for i, value in enumerate(self.include or ()):
            if value not in INCLUDE:
                raise bad_request(f"include {value!r} is not supported; supported: {', '.join(INCLUDE)}.",
                                  param=f"include[{i}]", code="unsupported_parameter")
        if self.truncation not in (None, "auto", "disabled"):
            raise bad_request("truncation is auto or disabled.", param="truncation")
        if self.service_tier not in (None, "auto", "default"):
            raise bad_request(f"service_tier {self.service_tier!r} is not offered; use auto or default.",
                              param="service_tier")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise bad_request("top_logprobs must be between 0 and 20.", param="top_logprobs")
        if self.reasoning is not None and (self.reasoning.summary or self.reasoning.generate_summary):
            raise bad_request("Reasoning summaries are not offered: the reasoning text itself is returned.",
                              param="reasoning.summary", code="unsupported_parameter")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise bad_request("text.verbosity is not supported.", param="text.verbosity",
                              code="unsupported_parameter")
        check_metadata(self.metadata)

    @property
    def stored(self) -> bool:
        return self.store is not False

    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())


ResponsesRequest = with_pending_fields(ResponsesRequest, NOT_SUPPORTED)


def check_metadata(metadata: dict[str, Any] | None) -> None:
    """OpenAI's limits: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return
    if len(metadata) > 16:
        raise bad_request("metadata holds at most 16 pairs.", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64:
            raise bad_request("metadata keys are at most 64 characters.", param="metadata")
        if not isinstance(value, str) or len(value) > 512:
            raise bad_request(f"metadata[{key!r}] must be a string of at most 512 characters.", param="metadata")


# --------------------------------------------------------------------------- tools


def response_tools(tools: list[dict[str, Any]] | None) -> tuple[FunctionTool, ...]:
    """The Responses API's function tools: ``{"type": "function", "name", "parameters", "strict", ...}``."""
    if tools is None:
        return ()
    if not tools:
        raise bad_request("tools must not be empty; leave it out to offer none.", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(f"Tool type {kind!r} is not supported; only function tools are.",
                              param=f"tools[{i}].type")
        extra = set(tool) - {"type", "name", "description", "parameters", "strict", "defer_loading"}
        if extra:
            raise bad_request(f"Unrecognized tool field(s): {', '.join(sorted(extra))}.",
                              param=f"tools[{i}].{sorted(extra)[0]}")
        out.append(function_tool(tool.get("name"), tool.get("parameters"), tool.get("description"),
                                 tool.get("strict"), f"tools[{i}]"))
    return unique(out, "tools")


# --------------------------------------------------------------------------- input items


@attrs.define(kw_only=True)
class InputPart:
    type: str
    text: str | None = None
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None
    image_url: str | None = None
    file_id: Any = None
    file_data: Any = None
    file_url: Any = None
    filename: Any = None
    detail: str | None = None


@attrs.define(kw_only=True)
class MessageItem:
    role: str
    content: str | list[InputPart]
    type: str = "message"
    id: str | None = None
    status: str | None = None
    phase: str | None = None


@attrs.define(kw_only=True)
class FunctionCallItem:
    type: str
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None
    namespace: str | None = None


@attrs.define(kw_only=True)
class FunctionCallOutputItem:
    type: str
    call_id: str
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None


@attrs.define(kw_only=True)
class ReasoningItem:
    type: str
    id: str | None = None
    summary: list[dict[str, Any]] = attrs.Factory(list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: str | None = None


ITEM_TYPES = {"message": MessageItem, "function_call": FunctionCallItem,
              "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem}
ROLES = ("user", "assistant", "system", "developer")


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def _parse_item(item: Any, i: int) -> Any:
    if not isinstance(item, dict):
        raise bad_request("Each input item must be an object.", param=f"input[{i}]")
    kind = item.get("type", "message")
    cls = ITEM_TYPES.get(kind)
    if cls is None:
        raise bad_request(f"Input items of type {kind!r} are not supported; supported: {', '.join(ITEM_TYPES)}.",
                          param=f"input[{i}].type")
    try:
        return structure(item, cls)
    except APIError as exc:
        exc.param = f"input[{i}].{exc.param}" if exc.param else f"input[{i}]"
        raise


TEXT_PARTS = ("input_text", "output_text", "text")
IMAGE_INPUT = "input_image"


def _part_text(part: InputPart, param: str, images: bool) -> str:
    if part.type not in TEXT_PARTS:
        kinds = "input_text, output_text" + (" or input_image" if images else " (text only here)")
        raise bad_request(f"Content parts of type {part.type!r} are not supported; use {kinds}.",
                          param=f"{param}.type")
    if part.text is None:
        raise bad_request(f"A {part.type!r} part needs its text.", param=f"{param}.text")
    return part.text


def _text(content: str | list[InputPart], param: str, images: bool = False) -> str:
    if isinstance(content, str):
        return content
    return "".join(_part_text(part, f"{param}[{j}]", images) for j, part in enumerate(content))


def _json_arguments(text: str) -> bool:
    """Whether a call's ``arguments`` are JSON (empty counts as ``{}``, as chat takes it)."""
    if not text.strip():
        return True
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _image_part(part: InputPart, param: str) -> ContentPart:
    """An ``input_image`` part as chat's ``image_url`` part (the same fetching, limits and SSRF rules)."""
    if part.file_id is not None:
        raise bad_request("input_image.file_id is not supported (this server has no Files API): send the image as "
                          "image_url, an https or data: URL.", param=f"{param}.file_id", code="unsupported_content")
    if not isinstance(part.image_url, str) or not part.image_url:
        raise bad_request("An input_image part needs image_url (an https, http or data: URL).",
                          param=f"{param}.image_url")
    unknown = [k for k in ("file_data", "file_url", "filename") if getattr(part, k) is not None]
    if unknown:
        raise bad_request(f"{unknown[0]} belongs to input_file parts, not input_image.", param=f"{param}.{unknown[0]}")
    url = {"url": part.image_url} if part.detail is None else {"url": part.image_url, "detail": part.detail}
    return ContentPart(type=IMAGE_PART, image_url=url)


def _content(content: str | list[InputPart], param: str) -> str | list[ContentPart]:
    """A message's content: its text, or its parts in order when it holds images (index for index, so a
    part's ``param`` stays the same)."""
    if isinstance(content, str) or not any(p.type == IMAGE_INPUT for p in content):
        return _text(content, param, images=True)
    return [_image_part(p, f"{param}[{j}]") if p.type == IMAGE_INPUT
            else ContentPart(type="text", text=_part_text(p, f"{param}[{j}]", images=True))
            for j, p in enumerate(content)]


def to_messages(items: list[dict[str, Any]], offset: int = 0,
                sources: list[int] | None = None) -> list[ChatMessage]:
    """Chat messages of input items (``offset``: where these items start in the request's ``input``, for
    the ``param`` of errors; ``sources``, when given, gets each message's item index)."""
    messages: list[ChatMessage] = []
    sources = [] if sources is None else sources
    reasoning: str | None = None
    open_calls = False  # the last message is an assistant turn that function_call items join
    for n, raw in enumerate(items):
        i = n + offset
        item = _parse_item(raw, i)
        if isinstance(item, MessageItem):
            if item.role not in ROLES:
                raise bad_request(f"Unknown role {item.role!r}; expected one of: {', '.join(ROLES)}.",
                                  param=f"input[{i}].role")
            content = _content(item.content, f"input[{i}].content")
            role = "system" if item.role == "developer" else item.role
            msg = ChatMessage(role=role, content=content)
            if role == "assistant" and reasoning is not None:
                msg.reasoning_content, reasoning = reasoning, None
            messages.append(msg)
            sources.append(i)
            open_calls = role == "assistant"
        elif isinstance(item, FunctionCallItem):
            if not _json_arguments(item.arguments):
                if item.status == "incomplete":  # cut off by max_output_tokens: never made (chat drops it too)
                    continue
                raise bad_request("A function_call's arguments must be JSON.",
                                  param=f"input[{i}].arguments")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if open_calls:
                messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
            else:
                msg = ChatMessage(role="assistant", content=None, tool_calls=[call])
                if reasoning is not None:
                    msg.reasoning_content, reasoning = reasoning, None
                messages.append(msg)
                sources.append(i)
                open_calls = True
        elif isinstance(item, FunctionCallOutputItem):
            output = _text(item.output, f"input[{i}].output")
            messages.append(ChatMessage(role="tool", content=output, tool_call_id=item.call_id))
            sources.append(i)
            open_calls = False
        else:  # reasoning: its text joins the next assistant turn
            texts = [c.get("text", "") for c in item.content or () if isinstance(c, dict)]
            reasoning = "".join(texts) or None
    return messages
