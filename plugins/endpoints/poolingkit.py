"""Shared by the pooling endpoints (embeddings, pooling, classify, score, rerank, Cohere embed):
request fields, inputs into prompt token ids (with truncation), and the answers' shapes.
The model's outputs come finished from the engine (:meth:`patchbay.served.ServedModel.pool`).

Not a plugin itself (it has no entry point); third-party pooling endpoints may import it.
"""

from __future__ import annotations

import time
import types
from typing import Any, Sequence

import attrs
import msgspec

from patchbay.errors import bad_request
from patchbay.served import ServedModel
from patchbay.serving import Serving
from patchbay.vectors import to_base64, to_list
from patchbay_plugins.endpoints.chatprompt import ChatMessage, render_messages
from patchbay_plugins.endpoints.streaming import until_disconnect

#: OpenAI / vLLM ``input``: a string, strings, token ids, or lists of token ids
Input = str | list[str] | list[int] | list[list[int]]


def now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- request fields


@attrs.define(kw_only=True)
class PoolingFields:
    """Fields every vLLM-style pooling request takes (``/v1/embeddings``, ``/pooling``, ``/classify``,
    ``/score``, ``/rerank``)."""

    model: str | None = None
    #: OpenAI documents it as having no effect on the output
    user: str | None = None
    #: keep this many tokens (-1: the model's limit); None: an input over the limit is a 400
    truncate_prompt_tokens: int | None = None
    #: which end truncation cuts: "right" keeps the first tokens, "left" the last (default: the tokenizer's)
    truncation_side: str | None = None
    request_id: str | None = None
    priority: int = 0
    mm_processor_kwargs: dict[str, Any] | None = None

    def validate_common(self, model: ServedModel) -> None:
        if self.priority and model.config.scheduling_policy != "priority":
            raise bad_request("priority needs a server started with --scheduling-policy priority.", param="priority")
        if self.request_id is not None and not self.request_id:
            raise bad_request("request_id must not be empty.", param="request_id")
        if self.mm_processor_kwargs:
            raise bad_request("'mm_processor_kwargs' is not supported: images are processed as the model folder says.",
                              param="mm_processor_kwargs", code="unsupported_parameter")
        if self.truncation_side not in (None, "left", "right"):
            raise bad_request(f"truncation_side must be 'left' or 'right' (got {self.truncation_side!r}).",
                              param="truncation_side")
        k = self.truncate_prompt_tokens
        if k is not None and (k < -1 or k == 0):
            raise bad_request("truncate_prompt_tokens must be -1 (the model's limit) or at least 1.",
                              param="truncate_prompt_tokens")

    def truncation(self, model: ServedModel) -> "Truncation | None":
        """The request's truncation (``truncate_prompt_tokens`` + ``truncation_side``), checked against the limit."""
        k = self.truncate_prompt_tokens
        if k is None:
            return None
        limit = model.max_input_tokens
        if k == -1:
            k = limit
        elif k > limit:
            raise bad_request(f"truncate_prompt_tokens ({k}) is more than the model's maximum of {limit} tokens.",
                              param="truncate_prompt_tokens")
        return Truncation(k, self.truncation_side or default_side(model))


@attrs.define(kw_only=True)
class InputFields(PoolingFields):
    """``input`` (OpenAI) or ``messages`` (vLLM's chat-shaped variant) plus their options."""

    input: Input | None = None
    messages: list[ChatMessage] | None = None
    #: default: true for ``input``, false for ``messages`` (the chat template adds them)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# --------------------------------------------------------------------------- limits and tokenizing


@attrs.frozen
class Truncation:
    """Keep ``max_tokens`` tokens (special tokens included), cutting at ``side``."""

    max_tokens: int
    side: str = "right"

    def cut(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_tokens:
            return ids
        return ids[: self.max_tokens] if self.side == "right" else ids[len(ids) - self.max_tokens :]


def default_side(model: ServedModel) -> str:
    side = model.tokenizer.truncation_side
    return side if side in ("left", "right") else "right"


def prepare_text(model: ServedModel, text: str) -> str:
    return text.lower() if model.pooling is not None and model.pooling.lower_case else text


def check_count(model: ServedModel, n: int, param: str) -> None:
    """At most ``--max-inputs-per-request`` inputs in one request (OpenAI's embeddings limit is 2,048)."""
    limit = model.config.max_inputs_per_request
    if n > limit:
        raise bad_request(f"{param} has {n} items; at most {limit} are allowed in one request "
                          "(--max-inputs-per-request).", param=param, code="too_many_inputs")


def tokenize_texts(model: ServedModel, texts: Sequence[str], *, add_special_tokens: bool = True,
                   truncation: Truncation | None = None) -> list[list[int]]:
    """Token ids of each text in one tokenizer call; truncation keeps the special tokens (as
    sentence-transformers and HF truncation do)."""
    if not texts:
        return []
    tok = model.tokenizer
    texts = [prepare_text(model, t) for t in texts]
    if truncation is None:
        return list(tok(texts, add_special_tokens=add_special_tokens)["input_ids"])
    specials = tok.num_special_tokens_to_add(False) if add_special_tokens else 0
    if truncation.max_tokens <= specials:
        raise bad_request(f"Cannot truncate to {truncation.max_tokens} tokens: the model adds {specials} special "
                          "tokens to every input.", param="truncate_prompt_tokens")
    old = tok.truncation_side
    tok.truncation_side = truncation.side  # no await in between: nothing else tokenizes meanwhile
    try:
        out = tok(texts, add_special_tokens=add_special_tokens, truncation=True, max_length=truncation.max_tokens)
    finally:
        tok.truncation_side = old
    return list(out["input_ids"])


def check_fits(model: ServedModel, n: int, param: str, *, hint: str = "truncate_prompt_tokens") -> None:
    if n == 0:
        raise bad_request("The input is empty.", param=param)
    limit = model.max_input_tokens
    if n > limit:
        raise bad_request(
            f"This model's maximum input length is {limit} tokens. However, this input has {n} tokens. "
            f"Shorten it, or set {hint} to truncate it.",
            param=param, code="context_length_exceeded")


@attrs.define
class PoolPrompt:
    """One prompt for the engine: token ids (and segment ids for text pairs)."""

    ids: list[int]
    token_type_ids: list[int] | None = None
    #: where it came from, for error messages ("input[2]")
    param: str = "input"
    #: its image (a dual encoder's image input: ids are placeholders), else None
    mm: Any = None


def _chat_view(req: Any, add_special: bool) -> Any:
    return types.SimpleNamespace(
        messages=req.messages, add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message, chat_template=req.chat_template,
        chat_template_kwargs=req.chat_template_kwargs, add_special_tokens=add_special)


def input_items(value: Any, param: str = "input") -> list[tuple[str, Any]]:
    """``(param, item)`` for each item of an OpenAI-style ``input`` (a string, strings, ids, lists of ids)."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif not value:
        raise bad_request(f"{param} must not be empty.", param=param)
    elif isinstance(value[0], int):
        items = [value]
    else:
        items = list(value)
    if len(items) == 1 and (isinstance(value, str) or isinstance(value[0], int)):
        return [(param, items[0])]
    return [(f"{param}[{i}]", item) for i, item in enumerate(items)]


def prompts_of(model: ServedModel, items: list[tuple[str, Any]], *, add_special_tokens: bool,
               truncation: Truncation | None, hint: str = "truncate_prompt_tokens") -> list[PoolPrompt]:
    """Texts and token-id lists into checked prompts (texts tokenized in one call)."""
    check_count(model, len(items), items[0][0].split("[", 1)[0] if items else "input")
    texts = [(i, item) for i, (_, item) in enumerate(items) if isinstance(item, str)]
    for i, text in texts:
        if not text:
            raise bad_request(f"{items[i][0]} must not be an empty string.", param=items[i][0])
    tokenized = tokenize_texts(model, [t for _, t in texts], add_special_tokens=add_special_tokens,
                               truncation=truncation)
    by_index = {i: ids for (i, _), ids in zip(texts, tokenized)}
    out = []
    for i, (param, item) in enumerate(items):
        if i in by_index:
            ids = by_index[i]
        else:
            ids = list(item)
            model.check_prompt_ids(ids, param)
            if truncation is not None:
                ids = truncation.cut(ids)
        check_fits(model, len(ids), param, hint=hint)
        out.append(PoolPrompt(ids, None, param))
    return out


async def input_prompts(model: ServedModel, req: InputFields) -> list[PoolPrompt]:
    """The prompts of a request with ``input`` or ``messages``."""
    truncation = req.truncation(model)
    if req.messages is not None:
        if req.input is not None:
            raise bad_request("Give either input or messages, not both.", param="messages")
        add_special = bool(req.add_special_tokens)
        ids = await render_messages(model, _chat_view(req, add_special))
        if truncation is not None:
            ids = truncation.cut(ids)
        check_fits(model, len(ids), "messages")
        return [PoolPrompt(ids, None, "messages")]
    if req.input is None:
        raise bad_request("'input' is a required property", param="input")
    add_special = True if req.add_special_tokens is None else req.add_special_tokens
    return prompts_of(model, input_items(req.input), add_special_tokens=add_special, truncation=truncation)


async def request_prompts(model: ServedModel, req: InputFields) -> list[PoolPrompt]:
    """:func:`input_prompts`, or on a dual encoder (text or image inputs) the one text or image of ``messages``."""
    from patchbay_plugins.endpoints.mminputs import dual_encoder, item_prompts, message_item

    if req.messages is None or not dual_encoder(model):
        return await input_prompts(model, req)
    if req.input is not None:
        raise bad_request("Give either input or messages, not both.", param="messages")
    truncation = req.truncation(model)
    return await item_prompts(model, [("messages", message_item(req.messages))], lambda items: prompts_of(
        model, items, add_special_tokens=True, truncation=truncation))


def pair_prompts(model: ServedModel, firsts: list[str], seconds: list[str], *, params: list[str],
                 first_param: str = "query", truncation: Truncation | None = None, fit_second: bool = False,
                 max_second_tokens: int | None = None) -> list[PoolPrompt]:
    """Cross-encoder inputs: each ``(first, second)`` pair as one prompt with segment ids.

    ``params`` name the second text of each pair (for errors). ``truncation``: cut pairs to that
    many tokens, longest side first (HF's ``longest_first``). ``fit_second``: cut only the
    second text so the pair fits the model (rerank documents); ``max_second_tokens``: cut the
    second text to at most that many tokens (Cohere's ``max_tokens_per_doc``). Otherwise a pair
    over the limit is a 400.
    """
    if not firsts:
        return []
    check_count(model, len(seconds), params[0].split("[", 1)[0])
    tok = model.tokenizer
    a = [prepare_text(model, t) for t in firsts]
    b = [prepare_text(model, t) for t in seconds]
    if truncation is not None:
        if truncation.max_tokens <= tok.num_special_tokens_to_add(True) + 1:
            raise bad_request(f"Cannot truncate text pairs to {truncation.max_tokens} tokens.",
                              param="truncate_prompt_tokens")
        return _pairs(model, a, b, params, truncation="longest_first", max_length=truncation.max_tokens)
    if not fit_second and max_second_tokens is None:
        return _pairs(model, a, b, params)
    limit = model.max_input_tokens
    specials = tok.num_special_tokens_to_add(True)
    lens = [len(ids) for ids in tok(a, add_special_tokens=False)["input_ids"]]
    room = limit - specials - max(lens)
    if room < 1:
        raise bad_request(f"The {first_param} has {max(lens)} tokens: no room is left for a document within the "
                          f"model's maximum of {limit} tokens.", param=first_param, code="context_length_exceeded")
    if max_second_tokens is not None:
        room = min(room, max_second_tokens)
    if len(set(lens)) == 1:
        return _pairs(model, a, b, params, truncation="only_second", max_length=lens[0] + specials + room)
    out = []
    for i in range(len(a)):
        out += _pairs(model, a[i : i + 1], b[i : i + 1], params[i : i + 1], truncation="only_second",
                      max_length=lens[i] + specials + room)
    return out


def _pairs(model: ServedModel, a: list[str], b: list[str], params: list[str], **kwargs: Any) -> list[PoolPrompt]:
    enc = model.tokenizer(a, b, **kwargs)
    types_ = enc.get("token_type_ids") if model.pooling.uses_token_type_ids else None
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        check_fits(model, len(ids), params[i])
        out.append(PoolPrompt(list(ids), list(types_[i]) if types_ is not None else None, params[i]))
    return out


# --------------------------------------------------------------------------- running


async def encode_prompts(model: ServedModel, engine_rid: str, prompts: list[PoolPrompt], task: str,
                         priority: int = 0, dimensions: int | None = None) -> list[Any]:
    """Each prompt's finished output (see :meth:`patchbay.served.ServedModel.pool`)."""
    return await model.pool(engine_rid, [(p.ids, p.token_type_ids) for p in prompts], task,
                            dimensions=dimensions, priority=priority, mm=[p.mm for p in prompts])


def json_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    from litestar import Response

    return Response(content=msgspec.json.encode(body), media_type="application/json", headers=headers or {})


def list_response(rid: str, model: str, data: list[dict[str, Any]], usage_: dict[str, Any],
                  headers: dict[str, str] | None = None) -> Any:
    """vLLM's list-shaped pooling answer: ``id``, ``object: list``, ``created``, ``model``, ``data``, ``usage``."""
    return json_response({"id": rid, "object": "list", "created": now(), "model": model, "data": data,
                          "usage": usage_}, headers)


async def pool_inputs(request: Any, serving: Serving, model: ServedModel, req: InputFields, task: str,
                      id_prefix: str, log_extra: dict[str, Any] | None = None,
                      dimensions: int | None = None) -> tuple[list[Any], int, str, dict[str, str]]:
    """Encode a request's ``input`` / ``messages`` on the engine (aborted if the client leaves):
    ``(outputs, prompt tokens, request id, response headers)``."""
    prompts = await request_prompts(model, req)
    rid, engine_rid, headers = serving.request_ids(request, req.request_id, id_prefix)
    num_tokens = sum(len(p.ids) for p in prompts)
    serving.log_request(rid, num_tokens, {"inputs": len(prompts), **(log_extra or {})})
    outs = await until_disconnect(request, encode_prompts(model, engine_rid, prompts, task, req.priority, dimensions))
    return outs, num_tokens, rid, headers


def usage(prompt_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
            "prompt_tokens_details": None}


# --------------------------------------------------------------------------- outputs


def embedding_size(model: ServedModel) -> int:
    return model.pooling.embedding_size


def check_dimensions(model: ServedModel, dimensions: int | None, param: str = "dimensions") -> int | None:
    """The requested output size (None: the full embedding); a 400 naming ``param`` otherwise."""
    if dimensions is None:
        return None
    facts = model.pooling
    size = facts.embedding_size
    if dimensions < 1:
        raise bad_request(f"{param} must be at least 1 (got {dimensions}).", param=param)
    if dimensions > size:
        raise bad_request(f"{param} ({dimensions}) is more than the model's embedding size ({size}).", param=param)
    if dimensions == size:
        return None
    if not facts.matryoshka:
        raise bad_request(f"This model does not support Matryoshka embeddings (its config has no is_matryoshka or "
                          f"matryoshka_dimensions), so {param} can only be {size}.", param=param,
                          code="unsupported_parameter")
    allowed = facts.matryoshka_dimensions
    if allowed is not None and dimensions not in allowed:
        raise bad_request(f"This model supports {param} in {list(allowed)} only (got {dimensions}).", param=param)
    return dimensions


def encode_vector(vec: Any, encoding_format: str) -> Any:
    return to_base64(vec) if encoding_format == "base64" else to_list(vec)


def check_encoding_format(value: str, param: str = "encoding_format") -> None:
    if value not in ("float", "base64"):
        raise bad_request(f"{param} must be 'float' or 'base64' (got {value!r}).", param=param)


def check_cross_encoder(model: ServedModel) -> None:
    labels = len(model.pooling.labels) or 1
    if labels != 1:
        raise bad_request(f"Scoring needs a cross-encoder with one output; this model classifies into {labels} "
                          "labels: use /classify.", param="model", code="unsupported_task")
