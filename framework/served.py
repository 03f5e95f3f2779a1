"""One served model, as endpoints see it: names, tasks, tokenizer, limits, facts, and its engine's calls.

Endpoints get a :class:`ServedModel` from ``serving.resolve(request.model)``
and use only what it offers: they never read the model's config, import
torch for math, or reach into the engine's scheduler.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from patchbay.chat import ChatTemplate, resolve_template_source
from patchbay.config import ConfigError, ServerConfig
from patchbay.engine.params import PoolingParams, RequestOutput, SamplingParams
from patchbay.errors import APIError, bad_request
from patchbay.loader import LoadedModel, kv_cache_blocks, load_model
from patchbay.image_inputs import ImageSupport
from patchbay.model import (
    ENCODER_KINDS,
    IMAGE_KINDS,
    CausalPoolingModel,
    EncoderDecoderModel,
    MultimodalInputs,
    MultimodalModel,
    PoolingFacts,
    SpeechFacts,
)
from patchbay.registry import Registries

if TYPE_CHECKING:
    from patchbay.engine.engine import Admission, Engine, EngineStats

log = logging.getLogger("patchbay.served")

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
    if flag == "vllm":
        return {}
    if flag == "auto":
        gen = loaded.generation_config
    else:
        path = Path(flag).expanduser() / "generation_config.json"
        if not path.is_file():
            raise ConfigError("--generation-config", f"no generation_config.json in {flag!r}")
        gen = json.loads(path.read_text())
    return {field: gen[key] for key, field in _GENERATION_KEYS.items() if gen.get(key) is not None}


def _parser_flags(config: ServerConfig, registries: Registries) -> list[tuple[str, str | None, dict, Any]]:
    """``(flag, name given, registered specs, protocol)`` of the tool-call and reasoning parsers."""
    from patchbay.tools import ReasoningParser, ToolParser

    return [("--tool-call-parser", config.tool_call_parser, registries.tool_parsers, ToolParser),
            ("--reasoning-parser", config.reasoning_parser, registries.reasoning_parsers, ReasoningParser)]


def check_parser_flags(config: ServerConfig, registries: Registries) -> None:
    """``--tool-call-parser`` and ``--reasoning-parser`` name registered parsers (else a start-up error)."""
    for flag, name, table, _ in _parser_flags(config, registries):
        if name is not None and name not in table:
            raise ConfigError(flag, f"no loaded plugin offers {name!r}; available: {', '.join(sorted(table)) or 'none'}")


def build_parsers(config: ServerConfig, registries: Registries, tokenizer: Any) -> tuple[Any, Any]:
    """The model's tool-call parser and reasoning parser (None when not asked for), checked against
    :mod:`patchbay.tools`' protocols."""
    check_parser_flags(config, registries)
    out = []
    for flag, name, table, kind in _parser_flags(config, registries):
        parser = None if name is None else table[name].factory(tokenizer)
        if parser is not None and not isinstance(parser, kind):
            raise ConfigError(flag, f"the {name!r} plugin built a {type(parser).__name__}, which lacks what a "
                                    f"{kind.__name__} has (see patchbay.tools)")
        out.append(parser)
    return out[0], out[1]


def build_engine(config: ServerConfig, loaded: LoadedModel, kv_budget: int | None = None) -> Engine:
    """The engine of one loaded model: runner by the model's kind, scheduler, KV cache (of ``kv_budget``
    bytes; default: this model's own, see :mod:`patchbay.budget`), its own sampling seed."""
    from patchbay.engine.blocks import BlockManager
    from patchbay.engine.engine import Engine
    from patchbay.engine.runner import EncoderRunner, ModelRunner
    from patchbay.engine.scheduler import Scheduler

    from patchbay.engine.multimodal import ImagePlacer

    num_blocks = kv_cache_blocks(config, loaded, kv_budget)
    encoder = loaded.kind in ENCODER_KINDS
    if encoder:
        cache = config.encoder_cache_tokens if loaded.kind in IMAGE_KINDS else 0
        runner: Any = EncoderRunner(loaded.model, image_cache_rows=cache)
    else:
        pooling = loaded.model.pooling if loaded.kind is CausalPoolingModel else None
        images = ImagePlacer(loaded.model, config.encoder_cache_tokens) if loaded.kind is MultimodalModel else None
        runner = ModelRunner(loaded.model, num_blocks=num_blocks, block_size=config.block_size, pooling=pooling,
                             seed=config.seed, encoder_decoder=loaded.kind is EncoderDecoderModel, images=images)
    # the CPU cache is committed page by page (runner.lazy_zeros): reuse written blocks first
    blocks = BlockManager(num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching,
                          lazy=not encoder and loaded.model.device.type == "cpu")
    scheduler = Scheduler(blocks, max_num_seqs=config.max_num_seqs,
                          max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
                          policy=config.scheduling_policy, needs_kv=not encoder)
    return Engine(runner, scheduler, loaded.tokenizer, eos_token_ids=loaded.eos_token_ids,
                  max_model_len=loaded.max_model_len, threads=loaded.threads, max_waiting=config.max_waiting_seqs)


class ServedModel:
    """A model behind the API: what endpoints may know of it and ask of it."""

    def __init__(self, config: ServerConfig, registries: Registries, loaded: LoadedModel, engine: Engine,
                 names: Sequence[str]):
        from patchbay.structured import ConstraintService

        #: this model's flags
        self.config = config
        #: the names the API accepts for it; the first is the one reported
        self.names = list(names)
        #: its directory (``root`` in /v1/models)
        self.model_dir = loaded.model_dir
        self.task = loaded.task
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.eos_token_ids = tuple(loaded.eos_token_ids)
        self.engine = engine
        self.created = int(time.time())
        model = loaded.model
        #: pooling facts (None for a generative model)
        self.pooling: PoolingFacts | None = (model.pooling if loaded.kind in (*ENCODER_KINDS, CausalPoolingModel)
                                             else None)
        #: width of the logits, or of an encoder's embedding table (may exceed the tokenizer's length)
        self.vocab_size = int(model.vocab_size)
        self._encoder = loaded.kind in ENCODER_KINDS
        #: a speech model's processor (prompts and output rules of audio windows), None otherwise
        self.speech = model.processor if loaded.kind is EncoderDecoderModel else None
        #: images: the model's processor (None: text only) and the fetcher of image URLs
        self.images = ImageSupport(loaded, config)
        self.chat_template = self.template(resolve_template_source(config.chat_template, self.tokenizer,
                                                                   self.model_dir))
        self.generation_defaults = generation_defaults(config.generation_config, loaded)
        if self.generation_defaults:
            log.info("defaults from generation_config.json (a request's own values win): %s",
                     self.generation_defaults)
        #: the logits processors requests may name
        self.logits_processors = registries.logits_processors
        #: the ``--tool-call-parser`` and ``--reasoning-parser`` objects (None when not set)
        self.tool_parser, self.reasoning_parser = build_parsers(config, registries, self.tokenizer)
        backend = config.structured_outputs_backend
        self.constraints = ConstraintService(registries.decoding_backends, lambda: self.tokenizer_info,
                                             default_backend=backend, timeout=config.structured_outputs_timeout,
                                             memory_bytes=config.structured_outputs_memory_bytes)
        if backend != "auto" and backend not in registries.decoding_backends:
            self.constraints.close()
            raise ConfigError("--structured-outputs-config", f"backend {backend!r} is not loaded; available: auto, "
                              f"{', '.join(self.constraints.names()) or 'none'}")
        self._tokenizer_info: Any = None

    @classmethod
    def build(cls, config: ServerConfig, registries: Registries, names: Sequence[str]) -> "ServedModel":
        loaded = load_model(config, registries)
        return cls(config, registries, loaded, build_engine(config, loaded), names)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.constraints.close()

    def admit(self, count: int = 1) -> Admission:
        """Admit a request of ``count`` sequences into its engine's waiting queue, or a 429 (with
        ``Retry-After``) when the queue is full: call before starting a stream, whose status is sent
        before the engine sees the request (see :meth:`patchbay.engine.engine.Engine.admit`)."""
        return self.engine.admit(count)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def image_cache_stats(self) -> tuple[int, int]:
        """Lookups of images in its image encoder cache (by image hash) and those found there; (0, 0) for a
        text-only model."""
        cache = self.engine.runner.encoder_cache
        return (cache.hits + cache.misses, cache.hits) if cache is not None else (0, 0)

    @property
    def dead(self) -> str | None:
        """Why its engine stopped, when it did (None: alive)."""
        return self.engine.dead

    # ------------------------------------------------------------------ facts

    @property
    def tasks(self) -> list[str]:
        """What it can do, in vLLM's task words."""
        return [self.task] if self.pooling is None else list(self.pooling.tasks)

    def require_task(self, *tasks: str) -> str:
        """The first of ``tasks`` it can do; a 400 naming what it can do otherwise."""
        for task in tasks:
            if task in self.tasks:
                return task
        raise bad_request(
            f"The model `{self.names[0]}` cannot do {' or '.join(repr(t) for t in tasks)}; it supports: "
            f"{', '.join(self.tasks)}.", param="model", code="unsupported_task")

    def template(self, source: str | None) -> ChatTemplate:
        """A chat template for this model, rendered under the server's budget (time, output size)."""
        return ChatTemplate(source, self.tokenizer, seconds=self.config.chat_template_render_timeout,
                            max_chars=self.config.chat_template_max_chars)

    @property
    def tokenizer_info(self) -> Any:
        """Token bytes and special ids of its tokenizer (built on first use)."""
        if self._tokenizer_info is None:
            from patchbay.tokenizer_info import build_tokenizer_info

            self._tokenizer_info = build_tokenizer_info(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._tokenizer_info

    @property
    def max_input_tokens(self) -> int:
        """The most tokens one pooling input may have: the context length, sentence-transformers'
        ``max_seq_length`` (as vLLM caps it) and, for encoders (whole prompts per step),
        ``--max-num-batched-tokens``."""
        limit = self.max_model_len
        if self.pooling is not None and self.pooling.max_input_tokens:
            limit = min(limit, int(self.pooling.max_input_tokens))
        if self._encoder:
            limit = min(limit, self.config.max_num_batched_tokens)
        return limit

    # ------------------------------------------------------------------ prompts

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_prompt_ids(self, ids: list[int], param: str = "prompt") -> None:
        vocab = len(self.tokenizer)
        for token in ids:
            if not 0 <= token < max(vocab, self.vocab_size):
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

    # ------------------------------------------------------------------ work

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, priority: int = 0,
                 cache_salt: str | None = None, mm: MultimodalInputs | None = None) -> AsyncIterator[RequestOutput]:
        """Output deltas of one sequence (see :meth:`patchbay.engine.engine.Engine.generate`); ``mm``: the
        prompt's images (:meth:`ImageSupport.place`)."""
        return self.engine.generate(request_id, prompt_ids, params, priority=priority, cache_salt=cache_salt, mm=mm)

    # ------------------------------------------------------------------ speech

    @property
    def speech_facts(self) -> SpeechFacts | None:
        """What a speech model can do (languages, translation, timestamps); None for other models."""
        return None if self.speech is None else self.speech.facts

    async def decode_audio(self, data: bytes) -> Any:
        """An uploaded audio file as the model's waveform (``patchbay.audio.Waveform``), decoded off the event
        loop; ``patchbay.audio.AudioError`` (a 400, ``param: "file"``) when it is not audio."""
        import asyncio

        from patchbay.audio import AudioError, decode_audio

        try:
            return await asyncio.to_thread(decode_audio, data, self.speech.facts.sampling_rate)
        except AudioError as exc:
            raise bad_request(str(exc), param="file", code="invalid_audio") from None

    def pcm16_audio(self, data: bytes, rate: int) -> Any:
        """Raw PCM16 mono samples at ``rate`` as the model's waveform."""
        from patchbay.audio import pcm16

        return pcm16(data, rate, self.speech.facts.sampling_rate)

    def transcribe(self, request_id: str, audio: Any, job: Any) -> AsyncIterator[Any]:
        """Text deltas, then the transcript, of ``audio`` (see :func:`patchbay.speech.transcribe`)."""
        from patchbay.speech import transcribe

        return transcribe(self, request_id, audio, job)

    async def pool(self, request_id: str, prompts: Sequence[tuple[list[int], list[int] | None]], task: str, *,
                   dimensions: int | None = None, priority: int = 0,
                   mm: Sequence[MultimodalInputs | None] | None = None) -> list[Any]:
        """Each ``(token ids, segment ids)`` prompt's finished output, all submitted at once so the engine
        batches them: embeddings (cut to ``dimensions``), class probabilities, or scores (float32 CPU
        tensors). An engine failure is a 500; cancelling aborts every prompt still running."""
        import asyncio

        admission = self.admit(len(prompts))
        mm = mm or [None] * len(prompts)
        tasks = [
            asyncio.ensure_future(self.engine.encode(
                f"{request_id}-{i}", ids, PoolingParams(task=task, token_type_ids=types, dimensions=dimensions),
                priority=priority, mm=mm[i]))
            for i, (ids, types) in enumerate(prompts)
        ]
        try:
            outs = await asyncio.gather(*tasks)
        finally:
            admission.release()
            for t in tasks:
                t.cancel()
        for out in outs:
            if out.finish_reason == "error":
                raise APIError(out.error or "internal error", status=500, type="server_error")
        return [out.pooled for out in outs]

    async def score(self, request_id: str, prompts: Sequence[tuple[list[int], list[int] | None]],
                    pairs: Sequence[tuple[int, int]] | None, *, priority: int = 0,
                    mm: Sequence[MultimodalInputs | None] | None = None) -> list[float]:
        """Scores by the model's rule: a cross-encoder scores each prompt (a text pair; ``pairs`` None);
        a bi-encoder embeds every prompt and scores each ``(i, j)`` of ``pairs`` by cosine similarity."""
        from patchbay.engine.pooling import cosine, score_value

        if pairs is None:
            return [score_value(out) for out in await self.pool(request_id, prompts, "score", priority=priority)]
        vectors = await self.pool(request_id, prompts, "embed", priority=priority, mm=mm)
        return cosine([vectors[i] for i, _ in pairs], [vectors[j] for _, j in pairs])
