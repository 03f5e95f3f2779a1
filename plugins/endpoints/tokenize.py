"""POST /tokenize and POST /detokenize, shaped as vLLM's."""

from __future__ import annotations

from typing import Any

import attrs
from litestar import Request, post

from patchbay import hookimpl
from patchbay.errors import bad_request
from patchbay.protocol import decode_json, structure
from patchbay.serving import ServingDep
from patchbay_plugins.endpoints.chatprompt import ChatMessage, render_chat
from patchbay_plugins.endpoints.tooling import ChatTool, chat_tools, template_tool


@attrs.define(kw_only=True)
class TokenizeCompletionRequest:
    prompt: str
    model: str | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


@attrs.define(kw_only=True)
class TokenizeChatRequest:
    messages: list[ChatMessage]
    model: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    tools: list[ChatTool] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


@attrs.define(kw_only=True)
class DetokenizeRequest:
    tokens: list[int]
    model: str | None = None


@post("/tokenize", status_code=200, opt={"body": TokenizeCompletionRequest | TokenizeChatRequest})
async def tokenize(request: Request, serving: ServingDep) -> dict:
    data = decode_json(await request.body())
    if isinstance(data, dict) and "messages" in data:
        req: Any = structure(data, TokenizeChatRequest)
        if req.mm_processor_kwargs:
            raise bad_request("'mm_processor_kwargs' is not supported: images are processed as the model folder says.",
                              param="mm_processor_kwargs")
        model, _ = serving.resolve(req.model)
        ids, _ = await render_chat(model, req, tools=[template_tool(t) for t in chat_tools(req.tools)] or None)
    else:
        req = structure(data, TokenizeCompletionRequest)
        model, _ = serving.resolve(req.model)
        ids = model.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    body: dict[str, Any] = {"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids,
                            "token_strs": None}
    if req.return_token_strs:
        body["token_strs"] = model.tokenizer.convert_ids_to_tokens(ids)
    return body


@post("/detokenize", status_code=200, opt={"body": DetokenizeRequest})
async def detokenize(request: Request, serving: ServingDep) -> dict:
    req = structure(decode_json(await request.body()), DetokenizeRequest)
    model, _ = serving.resolve(req.model)
    model.check_prompt_ids(req.tokens, "tokens")
    return {"prompt": model.tokenizer.decode(req.tokens)}


@hookimpl
def register_routes(register):
    register(tokenize)
    register(detokenize)
