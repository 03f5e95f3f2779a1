"""POST /v1/embed and /v2/embed — Cohere's embed API on the served embedding model.

v1 answers ``response_type: embeddings_floats`` (a list of float lists) unless the request
names ``embedding_types``, then ``embeddings_by_type``; v2 always answers by type (default
``float``). Types, as Cohere packs them:

- ``float``: the embedding; ``base64``: its little-endian float32 bytes, base64;
- ``int8`` / ``uint8``: each component scaled by 127 and rounded, clipped to [-128, 127]
  (``uint8``: the same plus 128, in [0, 255]) — a unit vector's components lie in [-1, 1];
- ``binary`` / ``ubinary``: one bit per component (1 when positive), packed eight to a byte,
  most significant bit first; ``ubinary`` bytes are in [0, 255], ``binary`` ones shifted by
  -128 into [-128, 127] (as sentence-transformers' ``quantize_embeddings`` packs them).

Images (a model that embeds text or images, such as CLIP): ``images`` (data URLs or other image URLs,
``input_type: "image"``), or ``inputs`` whose content is one ``image_url`` part; each image is one input,
and an input of a text and an image (or two images) is a 400.

``truncate`` (default ``END``) cuts long inputs at their end or start; ``NONE`` refuses them.
``input_type`` selects the model's named prompt prefix (``PoolingFacts.prompts``: its
sentence-transformers config's, or its HF config's ``task_instructions``) when it has one of
that name; Cohere's own input types are accepted without a prefix otherwise. The packing is
:func:`patchbay.vectors.encode`'s.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
from litestar import Request, Response, post

from patchbay import hookimpl
from patchbay.errors import bad_request
from patchbay.protocol import parse_body
from patchbay.served import ServedModel
from patchbay.serving import Serving, ServingDep
from patchbay.vectors import encode
from patchbay_plugins.endpoints.mminputs import ImageRef, Item, dual_encoder, item_prompts, single_item
from patchbay_plugins.endpoints.poolingkit import (
    PoolPrompt,
    Truncation,
    check_count,
    check_dimensions,
    check_fits,
    embedding_size,
    encode_prompts,
    json_response,
    tokenize_texts,
)
from patchbay_plugins.endpoints.streaming import until_disconnect

EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
TRUNCATE = ("NONE", "START", "END")
#: Cohere's documented input types; accepted with no prefix when the model has none for them
COHERE_INPUT_TYPES = ("search_document", "search_query", "classification", "clustering")


@attrs.define(kw_only=True)
class EmbedV1Request:
    texts: list[str] | None = None
    images: list[str] | None = None
    model: str | None = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    truncate: str | None = None


@attrs.define(kw_only=True)
class ContentItem:
    type: str
    text: str | None = None
    image_url: Any = None


@attrs.define(kw_only=True)
class EmbedInput:
    content: list[ContentItem]


@attrs.define(kw_only=True)
class EmbedV2Request:
    model: str | None = None
    input_type: str | None = None
    texts: list[str] | None = None
    images: list[str] | None = None
    inputs: list[EmbedInput] | None = None
    max_tokens: int | None = None
    output_dimension: int | None = None
    embedding_types: list[str] | None = None
    truncate: str | None = None
    priority: int | None = None


# --------------------------------------------------------------------------- shared work


def input_prefix(model: ServedModel, input_type: str | None) -> str:
    if input_type is None:
        return ""
    prompts = model.pooling.prompts
    if input_type in prompts:
        return prompts[input_type]
    if input_type in COHERE_INPUT_TYPES:
        return ""
    if input_type == "image":
        if model.images.available:
            return ""
        raise bad_request("input_type 'image' needs an image model; this one embeds text.", param="input_type")
    known = sorted(set(COHERE_INPUT_TYPES) | set(prompts))
    raise bad_request(f"Unknown input_type {input_type!r}; this model takes: {', '.join(known)}.",
                      param="input_type")


def check_types(types_: list[str] | None, default: list[str]) -> list[str]:
    kinds = default if types_ is None else types_
    if not kinds:
        raise bad_request("embedding_types must not be empty.", param="embedding_types")
    for i, kind in enumerate(kinds):
        if kind not in EMBEDDING_TYPES:
            raise bad_request(f"Unknown embedding type {kind!r}; use any of: {', '.join(EMBEDDING_TYPES)}.",
                              param=f"embedding_types[{i}]")
    return list(dict.fromkeys(kinds))


def prompts_for(model: ServedModel, texts: list[str], params: list[str], *, truncate: str,
                max_tokens: int | None) -> list[PoolPrompt]:
    """Tokenize with Cohere's truncation: END keeps the start, START keeps the end, NONE refuses
    inputs over the limit (``max_tokens`` when given, else the model's)."""
    if truncate not in TRUNCATE:
        raise bad_request(f"truncate must be one of {', '.join(TRUNCATE)} (got {truncate!r}).", param="truncate")
    if params:
        check_count(model, len(texts), params[0].split("[", 1)[0])
    limit = model.max_input_tokens
    keep = limit if max_tokens is None else min(limit, max_tokens)
    if truncate == "NONE":
        ids_list = tokenize_texts(model, texts)
        for ids, param in zip(ids_list, params):
            if max_tokens is not None and len(ids) > max_tokens:
                raise bad_request(f"{param} has {len(ids)} tokens, more than max_tokens ({max_tokens}); set truncate "
                                  "to END or START to cut it.", param=param, code="context_length_exceeded")
            check_fits(model, len(ids), param, hint="truncate (END or START)")
    else:
        if keep <= model.tokenizer.num_special_tokens_to_add(False):
            raise bad_request(f"max_tokens ({max_tokens}) leaves no room for text.", param="max_tokens")
        ids_list = tokenize_texts(model, texts, truncation=Truncation(keep, "right" if truncate == "END" else "left"))
    return [PoolPrompt(ids, None, param) for ids, param in zip(ids_list, params)]


async def embed(request: Request, serving: Serving, model: ServedModel, items: list[tuple[str, Item]], *,
                input_type: str | None, truncate: str, max_tokens: int | None, dimensions: int | None,
                priority: int) -> tuple[list[Any], int, str]:
    """``(vectors, prompt tokens, id)`` of ``(param, text or image)`` inputs."""
    prefix = input_prefix(model, input_type)
    for param, item in items:
        if isinstance(item, str) and not item:
            raise bad_request(f"{param} must not be an empty string.", param=param)
    if truncate not in TRUNCATE:
        raise bad_request(f"truncate must be one of {', '.join(TRUNCATE)} (got {truncate!r}).", param="truncate")

    def texts(pairs: list[tuple[str, str]]) -> list[PoolPrompt]:
        if not pairs:
            return []
        return prompts_for(model, [prefix + t for _, t in pairs], [p for p, _ in pairs], truncate=truncate,
                           max_tokens=max_tokens)

    prompts = await item_prompts(model, items, texts)
    rid = str(uuid.uuid4())
    num_tokens = sum(len(p.ids) for p in prompts)
    serving.log_request(rid, num_tokens, {"inputs": len(prompts), "input_type": input_type})
    vectors = await until_disconnect(request, encode_prompts(model, f"embed-{rid}", prompts, "embed", priority,
                                                             dimensions))
    return vectors, num_tokens, rid


def meta(version: str, num_tokens: int) -> dict[str, Any]:
    return {"api_version": {"version": version}, "billed_units": {"input_tokens": num_tokens},
            "tokens": {"input_tokens": num_tokens}}


def check_packable(model: ServedModel, kinds: list[str], dimensions: int | None) -> None:
    size = dimensions or embedding_size(model)
    if size % 8 and any(k in ("binary", "ubinary") for k in kinds):
        raise bad_request(f"binary and ubinary need an embedding size that is a multiple of 8 (this one is {size}).",
                          param="embedding_types")


def by_type(vectors: list[Any], kinds: list[str]) -> dict[str, Any]:
    return {kind: encode(vectors, kind) for kind in kinds}


# --------------------------------------------------------------------------- routes


def embedder(serving: Serving, req: EmbedV1Request | EmbedV2Request) -> ServedModel:
    """The model a request names, if it embeds what the request carries (text, or images on an image model)."""
    model, _ = serving.resolve(req.model)
    model.require_task("embed")
    if req.images:
        model.images.require("images")
    return model


def request_items(req: EmbedV1Request | EmbedV2Request) -> tuple[str, list[tuple[str, Item]]]:
    """``(field, items)`` of the one of ``texts`` / ``images`` a v1 request (or a v2 request without ``inputs``)
    gives."""
    given = [name for name in ("texts", "images") if getattr(req, name) is not None]
    if len(given) != 1:
        raise bad_request("Give texts or images (one of them).", param="texts")
    values = getattr(req, given[0]) or []
    if not values:
        raise bad_request(f"{given[0]} must be a non-empty list of strings.", param=given[0])
    if given[0] == "texts":
        return "texts", [(f"texts[{i}]", t) for i, t in enumerate(values)]
    return "images", [(f"images[{i}]", ImageRef(url)) for i, url in enumerate(values)]


def input_items(model: ServedModel, inputs: list[EmbedInput]) -> list[tuple[str, Item]]:
    """v2 ``inputs``: a dual encoder's one text or image each; a text model's text parts, joined."""
    items: list[tuple[str, Item]] = []
    for i, item in enumerate(inputs):
        if dual_encoder(model):
            items.append((f"inputs[{i}]", single_item(item.content, f"inputs[{i}].content")))
            continue
        parts = []
        for j, part in enumerate(item.content):
            if part.type == "image_url":
                model.images.require(f"inputs[{i}].content[{j}]")
            if part.type != "text" or part.text is None:
                raise bad_request(f"Content of type {part.type!r} is not supported: the served model embeds "
                                  "text.", param=f"inputs[{i}].content[{j}]")
            parts.append(part.text)
        items.append((f"inputs[{i}]", "\n".join(parts)))
    return items


@post("/v1/embed", status_code=200, opt={"body": EmbedV1Request})
async def embed_v1(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), EmbedV1Request)
    model = embedder(serving, req)
    _, items = request_items(req)
    kinds = None if req.embedding_types is None else check_types(req.embedding_types, ["float"])
    check_packable(model, kinds or [], None)
    vectors, num_tokens, rid = await embed(request, serving, model, items, input_type=req.input_type,
                                           truncate=req.truncate or "END", max_tokens=None, dimensions=None,
                                           priority=0)
    body: dict[str, Any] = {"id": rid, "texts": req.texts or [], "meta": meta("1", num_tokens)}
    if kinds is None:
        body.update(response_type="embeddings_floats", embeddings=encode(vectors, "float"))
    else:
        body.update(response_type="embeddings_by_type", embeddings=by_type(vectors, kinds))
    return json_response(body)


@post("/v2/embed", status_code=200, opt={"body": EmbedV2Request})
async def embed_v2(request: Request, serving: ServingDep) -> Response:
    req = parse_body(await request.body(), EmbedV2Request)
    model = embedder(serving, req)
    given = [name for name in ("texts", "images", "inputs") if getattr(req, name) is not None]
    if len(given) != 1:
        raise bad_request("Give one of texts, images or inputs.", param=given[-1] if given else "texts")
    if given == ["inputs"]:
        if not req.inputs:
            raise bad_request("inputs must not be empty.", param="inputs")
        items, echo = input_items(model, req.inputs), None
    else:
        field, items = request_items(req)
        echo = list(req.texts or []) if field == "texts" else None
    kinds = check_types(req.embedding_types, ["float"])
    if req.max_tokens is not None and req.max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1 (got {req.max_tokens}).", param="max_tokens")
    priority = req.priority or 0
    if priority and model.config.scheduling_policy != "priority":
        raise bad_request("priority needs a server started with --scheduling-policy priority.", param="priority")
    dims = check_dimensions(model, req.output_dimension, "output_dimension")
    check_packable(model, kinds, dims)
    vectors, num_tokens, rid = await embed(request, serving, model, items, input_type=req.input_type,
                                           truncate=req.truncate or "END", max_tokens=req.max_tokens,
                                           dimensions=dims, priority=priority)
    body: dict[str, Any] = {"id": rid, "response_type": "embeddings_by_type", "embeddings": by_type(vectors, kinds),
                            "meta": meta("2", num_tokens)}
    if echo is not None:
        body["texts"] = echo
    return json_response(body)


@hookimpl
def register_routes(register):
    register(embed_v1)
    register(embed_v2)
