"""What endpoint plugins work with: the served model, its tokenizer, chat template and engine.

Every route gets it as the ``serving`` dependency.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from litestar.di import NamedDependency

from patchbay.chat import ChatTemplate, resolve_template_source
from patchbay.config import ServerConfig
from patchbay.demo import DEMO_NAME
from patchbay.errors import APIError, bad_request
from patchbay.loader import LoadedModel, kv_cache_blocks, load_model
from patchbay.registry import Registries

log = logging.getLogger("patchbay.serving")


#: generation_config.json key -> request field it supplies a default for
_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(flag: str, loaded: LoadedModel) -> dict[str, Any]:
    """Request defaults from generation_config.json (``--generation-config auto|vllm|DIR``)."""
    import json
    from pathlib import Path

    if flag == "vllm":
        return {}
    if flag == "auto":
        gen = loaded.generation_config
    else:
        path = Path(flag).expanduser() / "generation_config.json"
        if not path.is_file():
            raise ValueError(f"--generation-config: no generation_config.json in {flag!r}")
        gen = json.loads(path.read_text())
    return {field: gen[key] for key, field in _GENERATION_KEYS.items() if gen.get(key) is not None}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Serving:
    def __init__(self, config: ServerConfig, registries: Registries, loaded: LoadedModel, engine: Any):
        self.config = config
        self.registries = registries
        self.loaded = loaded
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.model_names = list(config.served_model_name) or [config.model or DEMO_NAME]
        self.created = int(time.time())
        self.chat_template = ChatTemplate(resolve_template_source(config.chat_template, self.tokenizer), self.tokenizer)
        self.generation_defaults = generation_defaults(config.generation_config, loaded)
        if self.generation_defaults:
            log.info("defaults from generation_config.json (a request's own values win): %s",
                     self.generation_defaults)
        self._tokenizer_info: Any = None
        from patchbay.structured import ConstraintService

        backend = config.structured_outputs_backend
        if backend != "auto" and backend not in registries.decoding_backends:
            from patchbay.config import ConfigError

            raise ConfigError("--structured-outputs-config", f"backend {backend!r} is not loaded; available: auto, "
                              f"{', '.join(sorted(registries.decoding_backends)) or 'none'}")
        self.constraints = ConstraintService(registries.decoding_backends, lambda: self.tokenizer_info,
                                             default_backend=backend, timeout=config.structured_outputs_timeout)

    @classmethod
    def build(cls, config: ServerConfig, registries: Registries) -> "Serving":
        from patchbay.engine.blocks import BlockManager
        from patchbay.engine.engine import Engine
        from patchbay.engine.runner import EncoderRunner, ModelRunner
        from patchbay.engine.scheduler import Scheduler

        import torch

        torch.manual_seed(config.seed)  # unseeded sampling is reproducible per server start
        loaded = load_model(config, registries)
        num_blocks = kv_cache_blocks(config, loaded)
        encoder = getattr(loaded.model, "kind", "decoder") == "encoder"
        if encoder:
            runner: Any = EncoderRunner(loaded.model)
        else:
            runner = ModelRunner(loaded.model, num_blocks=num_blocks, block_size=config.block_size)
        blocks = BlockManager(num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
        scheduler = Scheduler(
            blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
            policy=config.scheduling_policy,
            needs_kv=not encoder,
        )
        engine = Engine(
            runner, scheduler, loaded.tokenizer,
            eos_token_ids=loaded.eos_token_ids, max_model_len=loaded.max_model_len, threads=loaded.threads,
        )
        log.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, config.block_size,
                 num_blocks * config.block_size)
        return cls(config, registries, loaded, engine)

    @property
    def tokenizer_info(self) -> Any:
        """Token bytes and special ids of the served tokenizer (built on first use)."""
        if self._tokenizer_info is None:
            from patchbay.tokenizer_info import build_tokenizer_info

            vocab = getattr(self.loaded.model, "vocab_size", len(self.tokenizer))
            self._tokenizer_info = build_tokenizer_info(self.tokenizer, vocab, self.loaded.eos_token_ids)
        return self._tokenizer_info

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.constraints.close()

    # ------------------------------------------------------------------ helpers for endpoints

    @property
    def tasks(self) -> list[str]:
        """What the served model can do: its task, plus ``score`` for pooling models."""
        task = self.loaded.task
        return [task, "score"] if task in ("embed", "classify") else [task]

    def check_model(self, name: str | None) -> str:
        """The served name a request asked for (the first one when it names none); 404 otherwise."""
        if name is None or name in self.model_names:
            return name or self.model_names[0]
        raise APIError(
            f"The model `{name}` does not exist. This server serves: {', '.join(self.model_names)}.",
            status=404,
            param="model",
            code="model_not_found",
        )

    def require_task(self, *tasks: str) -> str:
        """The first of ``tasks`` the served model can do; a 400 naming what it can do otherwise."""
        for task in tasks:
            if task in self.tasks:
                return task
        raise bad_request(
            f"The served model cannot do {' or '.join(repr(t) for t in tasks)}; it supports: "
            f"{', '.join(self.tasks)}.", param="model", code="unsupported_task")

    @property
    def vocab_size(self) -> int:
        """Width of the model's logits (may exceed the tokenizer's length)."""
        return int(getattr(self.loaded.model, "vocab_size", len(self.tokenizer)))

    def request_ids(self, request: Any, body_request_id: str | None, prefix: str) -> tuple[str, str, dict[str, str]]:
        """``(response id, engine id prefix, response headers)`` for one API request.

        The base id is the ``X-Request-Id`` header, else the body's ``request_id``, else
        random; ``--enable-request-id-headers`` echoes it back. Engine ids get a random
        suffix so two clients reusing an id never collide.
        """
        base = request.headers.get("x-request-id") or body_request_id or uuid.uuid4().hex
        response_id = f"{prefix}-{base}"
        headers = {"X-Request-Id": base} if self.config.enable_request_id_headers else {}
        return response_id, f"{response_id}-{uuid.uuid4().hex[:8]}", headers

    def log_request(self, request_id: str, num_prompt_tokens: int, params: Any) -> None:
        """Log a request's parameters (with --enable-log-requests)."""
        if self.config.enable_log_requests:
            log.info("request %s: %d prompt tokens, %s", request_id, num_prompt_tokens, params)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_prompt_ids(self, ids: list[int], param: str = "prompt") -> None:
        vocab = len(self.tokenizer)
        for token in ids:
            if not 0 <= token < max(vocab, getattr(self.loaded.model, "vocab_size", vocab)):
                raise bad_request(f"Token id {token} is out of the vocabulary (0..{vocab - 1}).", param=param)

    def check_length(self, num_prompt: int, param: str = "prompt") -> None:
        if num_prompt == 0:
            raise bad_request("The prompt is empty.", param=param)
        if num_prompt >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{num_prompt} tokens, which leaves no room for output. Please shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )

    def output_budget(self, num_prompt: int, requested: int | None, default: int | None) -> int:
        """max_tokens clamped to the context left after the prompt."""
        left = self.max_model_len - num_prompt
        wanted = requested if requested is not None else default
        return left if wanted is None else min(wanted, left)


#: How a route handler asks for the served model: ``async def handler(serving: ServingDep)``.
ServingDep = NamedDependency[Serving]
