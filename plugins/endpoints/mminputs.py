"""Image inputs of the pooling endpoints (embeddings, Cohere embed, score, rerank) on a model that embeds
text or images (a dual encoder such as CLIP): one input is one text or one image.

Wire shapes only: which part of a request is an image, and into which prompt it goes. The served model
fetches, decodes and preprocesses (``ServedModel.images``). Not a plugin itself.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

import attrs

from patchbay.errors import bad_request
from patchbay.served import ServedModel
from patchbay_plugins.endpoints.chatprompt import IMAGE_PARTS, TEXT_PARTS, ChatMessage, ContentPart, image_url
from patchbay_plugins.endpoints.poolingkit import PoolPrompt


@attrs.define(kw_only=True)
class MultimodalContent:
    """vLLM's multimodal score / rerank input: ``{"content": [parts]}``, each part one item."""

    content: list[ContentPart]


@attrs.frozen
class ImageRef:
    """An image input: its URL (``data:``, http(s), ``file://``)."""

    url: str


#: one input of a dual encoder
Item = str | ImageRef


def part_item(part: Any, param: str) -> Item:
    """A content part (chat's, vLLM's or Cohere's shape) as a text or an image."""
    kind = part.type if hasattr(part, "type") else part.get("type")
    if kind in IMAGE_PARTS:
        return ImageRef(image_url(part, param))
    if kind in TEXT_PARTS:
        text = part.text if hasattr(part, "text") else part.get("text")
        if not isinstance(text, str) or not text:
            raise bad_request(f"A '{kind}' part needs a non-empty text.", param=f"{param}.text")
        return text
    raise bad_request(f"Content parts of type {kind!r} are not supported here; use text or image_url.",
                      param=f"{param}.type")


def single_item(parts: Sequence[Any], param: str) -> Item:
    """The one text or image of an input; a dual encoder embeds them apart, so two things are a 400."""
    if len(parts) != 1:
        raise bad_request(f"This model embeds one text or one image per input; this input has {len(parts)} "
                          "parts (send them as separate inputs).", param=param, code="unsupported_content")
    return part_item(parts[0], f"{param}[0]")


def message_item(messages: list[ChatMessage], param: str = "messages") -> Item:
    """The one text or image of a chat-shaped input (vLLM's ``messages`` form of an image embedding)."""
    parts: list[tuple[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            parts.append((f"{param}[{i}].content", ContentPart(type="text", text=m.content)))
        elif m.content:
            parts += [(f"{param}[{i}].content[{j}]", p) for j, p in enumerate(m.content)]
    if len(parts) != 1:
        raise bad_request(f"This model embeds one text or one image per input, without a chat template; these "
                          f"messages hold {len(parts)} parts.", param=param, code="unsupported_content")
    return part_item(parts[0][1], parts[0][0])


def dual_encoder(model: ServedModel) -> bool:
    """The model takes images as inputs of their own (not placed into a text prompt)."""
    return model.images.available and model.images.image_token is None


def has_images(items: Sequence[tuple[str, Item]]) -> bool:
    return any(isinstance(item, ImageRef) for _, item in items)


async def item_prompts(model: ServedModel, items: Sequence[tuple[str, Item]],
                       text_prompts: Callable[[list[tuple[str, str]]], list[PoolPrompt]]) -> list[PoolPrompt]:
    """One prompt per ``(param, item)`` in order: texts through ``text_prompts`` (the endpoint's own tokenizing
    and truncation), images fetched and processed concurrently (a 400 names the first bad one)."""
    images = [(param, item.url) for param, item in items if isinstance(item, ImageRef)]
    if images:
        model.images.require(images[0][0])
    texts = text_prompts([(param, item) for param, item in items if isinstance(item, str)])
    prepared = list(await asyncio.gather(*(model.images.prepare([pair]) for pair in images)))
    text_iter, image_iter = iter(texts), iter(prepared)
    out = []
    for param, item in items:
        if isinstance(item, str):
            out.append(next(text_iter))
        else:
            ids, mm = model.images.alone(next(image_iter)[0])
            out.append(PoolPrompt(ids, None, param, mm))
    return out
