"""Chat messages and their rendering into prompt tokens (chat template, content format).

Shared by the chat and tokenize endpoints; not a plugin itself.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from patchbay.chat import MAX_REQUEST_TEMPLATE_CHARS, ChatTemplate, off_loop
from patchbay.errors import bad_request
from patchbay.served import ServedModel

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TEXT_PARTS = ("text", "input_text", "output_text")


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


# --------------------------------------------------------------------------- rendering


def parts_text(message: ChatMessage, index: int) -> list[str] | None:
    content = message.content
    if content is None:
        return None
    if isinstance(content, str):
        return [content]
    texts = []
    for j, part in enumerate(content):
        if part.type in TEXT_PARTS or part.type == "refusal":
            text = part.refusal if part.type == "refusal" else part.text
            if text is None:
                raise bad_request(f"A '{part.type}' content part needs its text.",
                                  param=f"messages[{index}].content[{j}]")
            texts.append(text)
        else:
            raise bad_request(
                f"Content parts of type '{part.type}' are not supported: the served model takes text only.",
                param=f"messages[{index}].content[{j}].type",
            )
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
        texts = parts_text(m, i)
        if texts is None:
            content: Any = None
        elif fmt == "openai":
            content = [{"type": "text", "text": t} for t in texts]
        else:
            content = "\n".join(texts)
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
        tail = "\n".join(parts_text(final, len(messages) - 1) or [])
        cut = prompt.rfind(tail) if tail else -1
        if cut < 0:
            raise bad_request("continue_final_message: the final message's content is not found in the "
                              "rendered template.", param="continue_final_message")
        prompt = prompt[: cut + len(tail)]
    return prompt
