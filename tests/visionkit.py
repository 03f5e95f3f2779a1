"""The transformers oracle of the vision families: Llava's greedy generation through its own processor."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import imagekit


@functools.lru_cache(maxsize=4)
def hf_llava(model_dir: Path) -> tuple[Any, Any]:
    """``(processor, model)`` of transformers for a Llava folder (cached per folder)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return AutoProcessor.from_pretrained(model_dir), LlavaForConditionalGeneration.from_pretrained(model_dir).eval()


def to_hf(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI chat messages with image_url parts (data URLs of :mod:`imagekit` images) -> transformers'
    messages (``{"type": "image"}`` parts) and the decoded images in order."""
    import base64
    import io

    from PIL import Image

    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for p in content:
            if p["type"] == "image_url":
                data = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                images.append(Image.open(io.BytesIO(data)))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p["text"]})
        out.append({"role": m["role"], "content": parts})
    return out, images


def hf_chat(model_dir: Path, messages: list[dict[str, Any]], max_tokens: int, *, tools: list[Any] | None = None,
            chat_template: str | None = None) -> dict[str, Any]:
    """transformers' greedy answer: ``text``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``
    (``tools`` and ``chat_template`` as ``apply_chat_template`` takes them)."""
    import torch

    processor, model = hf_llava(model_dir)
    hf_messages, images = to_hf(messages)
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False, tools=tools,
                                           chat_template=chat_template)
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, num_beams=1)
    n = inputs["input_ids"].shape[1]
    new = out[0, n:].tolist()
    eos = set(model.generation_config.eos_token_id or [])
    finish = "stop" if new and new[-1] in eos else "length"
    shown = new[:-1] if finish == "stop" else new
    # a character still incomplete at the end is not part of the text (the server's detokenizer holds it back)
    text = processor.tokenizer.decode(shown, skip_special_tokens=True).rstrip("\ufffd")
    return {"text": text, "finish_reason": finish,
            "prompt_tokens": n, "completion_tokens": len(new)}


def conversations() -> list[list[dict[str, Any]]]:
    """Chats with images of several sizes and modes, one or several, in any message."""
    img = imagekit.png_url
    return [
        [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                      {"type": "image_url", "image_url": {"url": img(40, 48, 1)}}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img(32, 32, 2)}},
                                      {"type": "text", "text": "Describe it."},
                                      {"type": "image_url", "image_url": {"url": img(100, 30, 3, "RGBA")}}]}],
        [{"role": "system", "content": "You look at pictures."},
         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": img(17, 20, 4, "L")}},
                                      {"type": "text", "text": "And this one?"}]},
         {"role": "assistant", "content": "A river."},
         {"role": "user", "content": [{"type": "text", "text": "Compare with"},
                                      {"type": "image_url", "image_url": {"url": img(64, 64, 5)}}]}],
    ]
