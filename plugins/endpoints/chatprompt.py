"""Chat messages and their rendering into prompt tokens (chat template, content format, images).

Image parts (``{"type": "image_url", "image_url": {"url": ...}}``) reach the chat template in order as
``{"type": "image"}`` parts (transformers' convention; a ``string``-format template gets the model's
image token, before the message's text, as vLLM places it). :func:`render_chat` fetches the images and
has the served model expand each image token into its placeholders.

Shared by the chat, tokenize and embeddings endpoints; not a plugin itself.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from patchbay.chat import MAX_REQUEST_TEMPLATE_CHARS, ChatTemplate, off_loop
from patchbay.errors import bad_request
from patchbay.model import MultimodalInputs
from patchbay.served import ServedModel

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TEXT_PARTS = ("text", "input_text", "output_text")
IMAGE_PART = "image_url"
#: image part types: chat's, and the Responses API's ``{"type": "input_image", "image_url": URL, "detail"}``
#: (vLLM takes both in chat messages)
IMAGE_PARTS = (IMAGE_PART, "input_image")
#: ``image_url.detail`` values accepted (the image is processed at the model's one resolution whatever they say)
IMAGE_DETAILS = ("auto", "low", "high")
#: what an ``image_url`` part's ``image_url`` may be (checked by :func:`image_url`, whose errors name the field)
IMAGE_URL_SCHEMA = {"anyOf": [
    {"type": "object", "properties": {"url": {"type": "string"}, "detail": {"enum": list(IMAGE_DETAILS)}},
     "required": ["url"], "additionalProperties": False},
    {"type": "string"}, {"type": "null"}]}


@attrs.define(kw_only=True)
class ContentPart:
    type: str
    text: str | None = None
    image_url: Any = attrs.field(default=None, metadata={"schema": IMAGE_URL_SCHEMA})
    input_audio: Any = None
    video_url: Any = None
    file: Any = None
    refusal: str | None = None
    #: an ``input_image`` part's detail (an ``image_url`` part keeps it inside ``image_url``)
    detail: str | None = None


@attrs.define(kw_only=True)
class ChatMessage:
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None


# --------------------------------------------------------------------------- rendering


def _detail(detail: Any, param: str) -> None:
    if detail not in IMAGE_DETAILS:
        raise bad_request(f"detail must be one of {', '.join(IMAGE_DETAILS)} (got {detail!r}).", param=param)


def image_url(part: Any, param: str) -> str:
    """The URL of an image content part: ``image_url`` (``{"url": ...}``, or the URL itself as vLLM also takes
    it) or ``input_image`` (``image_url`` the URL itself, ``detail`` beside it)."""
    get = part.get if isinstance(part, dict) else lambda key: getattr(part, key, None)
    value = get("image_url")
    if get("detail") is not None:
        if get("type") != "input_image":
            raise bad_request("An image_url part keeps detail inside image_url.", param=f"{param}.detail")
        _detail(get("detail"), f"{param}.detail")
    if isinstance(value, str):
        url = value
    elif isinstance(value, dict) and get("type") != "input_image":
        url = value.get("url")
        unknown = set(value) - {"url", "detail"}
        if unknown:
            raise bad_request(f"Unknown field(s) {sorted(unknown)} in an image_url part.", param=f"{param}.image_url")
        _detail(value.get("detail", "auto"), f"{param}.image_url.detail")
    else:
        url = None
    if not isinstance(url, str) or not url:
        if get("type") == "input_image":
            raise bad_request("An input_image part needs image_url (an https, http or data: URL).",
                              param=f"{param}.image_url")
        raise bad_request("An image_url part needs image_url.url (an https, http or data: URL).",
                          param=f"{param}.image_url.url")
    return url


def image_urls(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """``(param, url)`` of every image part, in the order the template renders them."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type in IMAGE_PARTS:
                    param = f"messages[{i}].content[{j}]"
                    out.append((param, image_url(part, param)))
    return out


def parts_text(message: ChatMessage, index: int, *, skip_images: bool = False) -> list[str] | None:
    content = message.content
    if content is None:
        return None
    if isinstance(content, str):
        return [content]
    texts = []
    for j, part in enumerate(content):
        if skip_images and part.type in IMAGE_PARTS:
            continue
        if part.type in TEXT_PARTS or part.type == "refusal":
            text = part.refusal if part.type == "refusal" else part.text
            if text is None:
                raise bad_request(f"A '{part.type}' content part needs its text.",
                                  param=f"messages[{index}].content[{j}]")
            texts.append(text)
        else:
            takes = "text and image_url parts" if skip_images else "text only"
            raise bad_request(f"Content parts of type '{part.type}' are not supported: the served model takes {takes}.",
                              param=f"messages[{index}].content[{j}].type")
    return texts


def template_for(model: ServedModel, req: Any) -> ChatTemplate:
    if req.chat_template is None:
        return model.chat_template
    if not model.config.trust_request_chat_template:
        raise bad_request("A per-request chat_template needs a server started with --trust-request-chat-template.",
                          param="chat_template")
    if len(req.chat_template) > MAX_REQUEST_TEMPLATE_CHARS:
        raise bad_request(f"chat_template is longer than {MAX_REQUEST_TEMPLATE_CHARS} characters.",
                          param="chat_template")
    try:
        return model.template(req.chat_template)
    except ValueError as exc:
        raise bad_request(str(exc).replace("--chat-template", "chat_template"), param="chat_template") from None


async def render_messages(model: ServedModel, req: Any, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The prompt token ids of a chat-shaped request (template, content format, documents, ``tools`` as the
    template gets them, ``continue_final_message``); ``req.documents`` may be absent. The template is
    compiled and rendered in a render thread; the tokenizer runs here (a fast tokenizer shared across
    threads can fail)."""
    prompt = await off_loop(render_prompt, model, req, tools)
    return model.encode(prompt, add_special_tokens=bool(req.add_special_tokens))


def message_content(model: ServedModel, m: ChatMessage, i: int, fmt: str) -> Any:
    """A message's content as the template takes it (``fmt``: ``openai`` parts or a ``string``), images included."""
    if not isinstance(m.content, list) or not any(p.type in IMAGE_PARTS for p in m.content):
        texts = parts_text(m, i)
        if texts is None:
            return None
        return [{"type": "text", "text": t} for t in texts] if fmt == "openai" else "\n".join(texts)
    token = model.images.image_token
    if token is None:  # a text-only model, or a dual encoder (whose messages never reach a template)
        first = next(j for j, p in enumerate(m.content) if p.type in IMAGE_PARTS)
        model.images.require(f"messages[{i}].content[{first}].type")
        raise bad_request("This model embeds one text or one image per input, without a chat template.",
                          param=f"messages[{i}].content[{first}]", code="unsupported_content")
    texts = parts_text(m, i, skip_images=True) or []
    if fmt == "openai":
        parts, pending = [], iter(texts)
        for p in m.content:
            parts.append({"type": "image"} if p.type in IMAGE_PARTS else {"type": "text", "text": next(pending)})
        return parts
    return "\n".join([token] * sum(p.type in IMAGE_PARTS for p in m.content) + texts)


def template_tool_calls(calls: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` as chat templates read them (as vLLM hands them over): each
    function's ``arguments`` JSON text parsed into an object."""
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request("A tool call needs a function with a name.", param=f"messages[{index}].tool_calls[{j}]")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise bad_request("A tool call's arguments must be JSON.",
                                  param=f"messages[{index}].tool_calls[{j}].function.arguments") from None
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def render_prompt(model: ServedModel, req: Any, tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text of a chat-shaped request (see :func:`render_messages`)."""
    messages = req.messages
    if not messages:
        raise bad_request("messages must not be empty.", param="messages")
    if req.continue_final_message and req.add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true.",
                          param="continue_final_message")
    template = template_for(model, req)
    fmt = model.config.chat_template_content_format
    if fmt == "auto":
        fmt = template.content_format
    plain = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise bad_request(f"Unknown role {m.role!r} in messages[{i}]; expected one of: {', '.join(ROLES)}.",
                              param=f"messages[{i}].role")
        content = message_content(model, m, i, fmt)
        # as transformers hands messages to templates: keys whose value is None left out
        entry: dict[str, Any] = {"role": m.role} if content is None else {"role": m.role, "content": content}
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                entry[key] = getattr(m, key)
        if m.tool_calls is not None:
            entry["tool_calls"] = template_tool_calls(m.tool_calls, i)
        if m.reasoning_content is not None:
            entry["thinking"] = entry["reasoning_content"] = m.reasoning_content
        plain.append(entry)
    kwargs = dict(req.chat_template_kwargs or {})
    for reserved in ("messages", "add_generation_prompt"):
        if reserved in kwargs:
            raise bad_request(f"chat_template_kwargs must not set {reserved!r}.", param="chat_template_kwargs")
    # as transformers: tools and documents always passed (None when absent); the request's own fields win
    documents = getattr(req, "documents", None)
    kwargs["tools"] = tools if tools is not None else kwargs.get("tools")
    kwargs["documents"] = documents if documents is not None else kwargs.get("documents")
    prompt = template.render(plain, add_generation_prompt=req.add_generation_prompt, **kwargs)
    if req.continue_final_message:
        final = messages[-1]
        tail = "\n".join(parts_text(final, len(messages) - 1, skip_images=True) or [])
        cut = prompt.rfind(tail) if tail else -1
        if cut < 0:
            raise bad_request("continue_final_message: the final message's content is not found in the "
                              "rendered template.", param="continue_final_message")
        prompt = prompt[: cut + len(tail)]
    return prompt


async def render_chat(model: ServedModel, req: Any, truncate: Any = None,
                      tools: list[dict[str, Any]] | None = None,
                      known: dict[str, Any] | None = None) -> tuple[list[int], MultimodalInputs | None]:
    """:func:`render_messages` with the messages' images: fetched, processed, each image token expanded into
    its placeholders. ``truncate(ids)`` (the request's ``truncate_prompt_tokens``) may only cut text before the
    first image. ``known``: images this request already prepared, by URL (see ``ImageSupport.prepare``)."""
    ids = await render_messages(model, req, tools)
    urls = image_urls(req.messages)
    mm = None
    if urls:
        ids, mm = model.images.place(ids, await model.images.prepare(urls, known), "messages")
    if truncate is None:
        return ids, mm
    kept = truncate(ids)
    return kept, None if mm is None else model.images.shift(mm, len(ids) - len(kept), "truncate_prompt_tokens")
