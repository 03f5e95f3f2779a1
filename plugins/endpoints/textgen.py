"""Shared by the completions and chat endpoints: request fields, their validation, and the
conversion into engine :class:`~patchbay.engine.params.SamplingParams`.

Not a plugin itself (it has no entry point); third-party text endpoints may import it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs

from patchbay.decoding import ConstraintSpec
from patchbay.engine.params import SamplingParams
from patchbay.errors import bad_request
from patchbay.logits import build_processor
from patchbay.served import ServedModel

#: Documented request fields this server does not implement yet, with their
#: neutral values. A request that sets one to anything else gets a 400 naming it.
NOT_YET_COMMON: dict[str, tuple[Any, ...]] = {}

NOT_YET_CHAT: dict[str, tuple[Any, ...]] = {
    "structural_tag": (None,),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
}

#: fields that ask for something this server will never do (no multimodal, no disaggregated KV)
REFUSED: dict[str, tuple[Any, ...]] = {
    "kv_transfer_params": (None, {}),
    "mm_processor_kwargs": (None, {}),
}


def check_sampling_values(req: Any) -> None:
    """Range checks of the sampling fields text and speech requests share (``top_p``, ``top_k``, ``min_p``,
    ``seed``, the penalties); a 400 naming the field."""
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1] (got {req.top_p}).", param="top_p")
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(f"top_k must be -1 (off), 0 (off) or positive (got {req.top_k}).", param="top_k")
    if req.min_p is not None and not 0 <= req.min_p <= 1:
        raise bad_request(f"min_p must be in [0, 1] (got {req.min_p}).", param="min_p")
    if req.seed is not None and not -(2**63) <= req.seed < 2**64:
        raise bad_request("seed is out of range.", param="seed")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not -2 <= value <= 2:
            raise bad_request(f"{name} must be in [-2, 2] (got {value}).", param=name)
    if req.repetition_penalty is not None and req.repetition_penalty <= 0:
        raise bad_request(f"repetition_penalty must be positive (got {req.repetition_penalty}).",
                          param="repetition_penalty")


def with_pending_fields(cls: type, *tables: dict[str, tuple[Any, ...]]) -> type:
    """``cls`` plus an optional untyped field for each not-yet-implemented parameter."""
    fields = {name: attrs.field(default=None, kw_only=True) for table in tables for name in table}
    sub = attrs.make_class(cls.__name__, fields, bases=(cls,))
    sub.__module__ = cls.__module__
    sub.pending_fields = {k: v for table in tables for k, v in table.items()}
    return sub


def check_not_yet(request: Any) -> None:
    for name, neutral in getattr(request, "pending_fields", {}).items():
        value = getattr(request, name)
        if any(value == n and type(value) is type(n) for n in neutral):
            continue
        raise bad_request(f"'{name}' is not supported by this server yet.", param=name, code="unsupported_parameter")


@attrs.define(kw_only=True)
class StreamOptions:
    include_usage: bool = False
    continuous_usage_stats: bool = False


@attrs.define(kw_only=True)
class ProcessorRef:
    qualname: str
    args: list[Any] = attrs.Factory(list)
    kwargs: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    disable_additional_properties: bool = False


@attrs.define(kw_only=True)
class JsonSchemaFormat:
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


@attrs.define(kw_only=True)
class ResponseFormat:
    type: str
    json_schema: JsonSchemaFormat | None = None


@attrs.define(kw_only=True)
class SamplingFields:
    """Request fields shared by /v1/completions and /v1/chat/completions (OpenAI's and vLLM's)."""

    model: str | None = None
    max_tokens: int | None = None
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    min_tokens: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = None
    add_special_tokens: bool | None = None
    request_id: str | None = None
    priority: int = 0
    cache_salt: str | None = None
    vllm_xargs: dict[str, Any] | None = None
    logits_processors: list[str | ProcessorRef] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    service_tier: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None

    # ------------------------------------------------------------------ validation

    def validate_sampling(self, model: ServedModel) -> None:
        """Range checks that do not need the prompt. Raises a 400 naming the field."""
        check_not_yet(self)
        for name, neutral in REFUSED.items():
            if getattr(self, name, None) not in neutral:
                raise bad_request(f"'{name}' is not supported: this server does not do that.", param=name,
                                  code="unsupported_parameter")
        if not 1 <= self.n <= 128:
            raise bad_request(f"n must be between 1 and 128 (got {self.n}).", param="n")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise bad_request(f"best_of must be at least n ({self.n}); got {self.best_of}.", param="best_of")
            if self.best_of > 128:
                raise bad_request(f"best_of must be at most 128 (got {self.best_of}).", param="best_of")
            if self.stream and self.best_of > self.n:
                raise bad_request("best_of > n cannot be streamed: the best candidates are known only at the end.",
                                  param="best_of")
        if self.max_tokens is not None and self.max_tokens < self.least_max_tokens():
            raise bad_request(f"max_tokens must be at least 1 (got {self.max_tokens}).", param="max_tokens")
        if self.temperature is not None and self.temperature < 0:
            raise bad_request(f"temperature must be at least 0 (got {self.temperature}).", param="temperature")
        check_sampling_values(self)
        if self.min_tokens < 0:
            raise bad_request(f"min_tokens must be at least 0 (got {self.min_tokens}).", param="min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad_request("min_tokens must not exceed max_tokens.", param="min_tokens")
        if self.truncate_prompt_tokens is not None and (self.truncate_prompt_tokens < -1 or self.truncate_prompt_tokens == 0):
            raise bad_request("truncate_prompt_tokens must be -1 (the context length) or at least 1.",
                              param="truncate_prompt_tokens")
        if self.prompt_logprobs is not None:
            self._check_logprob_count(model, "prompt_logprobs", self.prompt_logprobs, allow_all=True)
            if self.stream:
                raise bad_request("prompt_logprobs cannot be streamed.", param="prompt_logprobs")
        for s in self.stop_list():
            if not s:
                raise bad_request("stop strings must not be empty.", param="stop")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
        if self.priority and model.config.scheduling_policy != "priority":
            raise bad_request("priority needs a server started with --scheduling-policy priority.", param="priority")
        if self.service_tier not in (None, "auto", "default"):
            raise bad_request(f"service_tier {self.service_tier!r} is not offered; use auto or default.",
                              param="service_tier")
        if self.use_beam_search:
            if self.stream:
                raise bad_request("use_beam_search cannot be streamed.", param="use_beam_search")
            if self.logits_processors:
                raise bad_request("use_beam_search cannot be combined with logits_processors.",
                                  param="logits_processors")
        if self.request_id is not None and not self.request_id:
            raise bad_request("request_id must not be empty.", param="request_id")

    def least_max_tokens(self) -> int:
        """The smallest ``max_tokens`` this request may ask for."""
        return 1

    @staticmethod
    def _check_logprob_count(model: ServedModel, name: str, value: int, allow_all: bool = False) -> None:
        limit = model.config.max_logprobs
        if value < (-1 if allow_all else 0):
            raise bad_request(f"{name} must be at least 0 (got {value}).", param=name)
        if value > limit:
            raise bad_request(f"{name} ({value}) is more than this server allows (--max-logprobs {limit}).",
                              param=name)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    # ------------------------------------------------------------------ prompt handling

    def truncate(self, ids: list[int], model: ServedModel) -> list[int]:
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        if k == -1:
            k = model.max_model_len - 1
        return ids[-k:] if len(ids) > k else ids

    # ------------------------------------------------------------------ conversion

    def sampling_params(
        self, model: ServedModel, *, num_prompt_tokens: int, max_tokens: int | None, default_max_tokens: int | None,
        logprobs: int | None,
    ) -> SamplingParams:
        """The engine parameters of a prompt's choices; generation_config defaults fill unset fields.
        ``max_tokens``: what the request asked for (None: generation_config's, else ``default_max_tokens``)."""
        defaults = model.generation_defaults
        vocab = model.vocab_size

        def pick(name: str, neutral: Any) -> Any:
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name, neutral)
            return value

        requested = max_tokens
        if requested is None:
            requested = defaults.get("max_tokens", default_max_tokens)
        for t in self.stop_token_ids or ():
            if not 0 <= t < vocab:
                raise bad_request(f"stop_token_ids: {t} is not a token id of this model.", param="stop_token_ids")
        top_k = pick("top_k", 0)
        return SamplingParams(
            max_tokens=model.output_budget(num_prompt_tokens, requested, None),
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=0 if top_k < 0 else min(top_k, vocab),  # more than the vocabulary is all of it
            min_p=pick("min_p", 0.0),
            seed=self.seed,
            stop=self.stop_list(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias=self._logit_bias(vocab),
            allowed_token_ids=self._allowed(vocab),
            bad_words_ids=self._bad_words(model),
            logprobs=logprobs,
            prompt_logprobs=None if self.prompt_logprobs is None else max(self.prompt_logprobs, 0),
            extra_args=self.vllm_xargs,
        )

    def _logit_bias(self, vocab: int) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids; got {key!r}.", param="logit_bias") from None
            if not 0 <= token < vocab:
                raise bad_request(f"logit_bias: {token} is not a token id of this model.", param="logit_bias")
            if not -100 <= bias <= 100:
                raise bad_request(f"logit_bias values must be in [-100, 100]; got {bias}.", param="logit_bias")
            out[token] = float(bias)
        return out

    def _allowed(self, vocab: int) -> tuple[int, ...] | None:
        if self.allowed_token_ids is None:
            return None
        if not self.allowed_token_ids:
            raise bad_request("allowed_token_ids must not be empty.", param="allowed_token_ids")
        for t in self.allowed_token_ids:
            if not 0 <= t < vocab:
                raise bad_request(f"allowed_token_ids: {t} is not a token id of this model.",
                                  param="allowed_token_ids")
        return tuple(self.allowed_token_ids)

    def _bad_words(self, model: ServedModel) -> tuple[tuple[int, ...], ...]:
        """Each bad word as token sequences, with and without a leading space (as vLLM does)."""
        out: set[tuple[int, ...]] = set()
        for word in self.bad_words or ():
            if not word.strip():
                raise bad_request("bad_words entries must not be blank.", param="bad_words")
            for variant in (word, " " + word.lstrip()):
                ids = tuple(model.encode(variant, add_special_tokens=False))
                if ids:
                    out.add(ids)
        return tuple(sorted(out))

    def constraint_request(self, model: ServedModel) -> tuple[ConstraintSpec, str | None, str] | None:
        """The request's one output constraint as ``(spec, requested backend, param)``, or None."""
        found: list[tuple[str, str, Any]] = []
        for param, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                            ("guided_grammar", "grammar")):
            if getattr(self, param) is not None:
                found.append((param, kind, getattr(self, param)))
        so = self.structured_outputs
        if so is not None:
            if so.structural_tag is not None:
                raise bad_request("structural_tag is not supported by this server yet.",
                                  param="structured_outputs.structural_tag", code="unsupported_parameter")
            if so.disable_additional_properties:
                raise bad_request("disable_additional_properties is not supported.",
                                  param="structured_outputs.disable_additional_properties",
                                  code="unsupported_parameter")
            for attr in ("json", "regex", "choice", "grammar"):
                if getattr(so, attr) is not None:
                    found.append((f"structured_outputs.{attr}", attr, getattr(so, attr)))
            if so.json_object:
                found.append(("structured_outputs.json_object", "json_object", None))
        rf = self.response_format
        if rf is not None:
            if rf.type == "json_object":
                found.append(("response_format", "json_object", None))
            elif rf.type == "json_schema":
                if rf.json_schema is None or rf.json_schema.schema is None:
                    raise bad_request("response_format json_schema needs json_schema.schema.",
                                      param="response_format.json_schema")
                found.append(("response_format.json_schema.schema", "json", rf.json_schema.schema))
            elif rf.type != "text":
                raise bad_request(f"response_format type {rf.type!r} is not supported; use text, json_object or "
                                  "json_schema.", param="response_format.type")
        if not found:
            return None
        if len(found) > 1:
            names = ", ".join(p for p, _, _ in found)
            raise bad_request(f"A request may carry one output constraint; this one has {len(found)}: {names}.",
                              param=found[1][0])
        param, kind, value = found[0]
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise bad_request(f"{param} is not valid JSON: {exc}", param=param) from None
        if kind == "json" and not isinstance(value, dict):
            raise bad_request(f"{param} must be a JSON schema object.", param=param)
        if kind == "choice" and (not value or not all(value)):
            raise bad_request(f"{param} needs at least one non-empty choice.", param=param)
        if kind in ("regex", "grammar") and not value:
            raise bad_request(f"{param} must not be empty.", param=param)
        if self.use_beam_search:
            raise bad_request("use_beam_search cannot be combined with an output constraint.",
                              param="use_beam_search")
        whitespace = self.guided_whitespace_pattern or (so.whitespace_pattern if so else None)
        no_ws = bool(so and so.disable_any_whitespace) or model.config.structured_outputs_disable_any_whitespace
        spec = ConstraintSpec(kind=kind, value=value, whitespace_pattern=whitespace, disable_any_whitespace=no_ws)
        return spec, self.guided_decoding_backend, param

    async def compile_constraint(self, model: ServedModel) -> Any:
        """The compiled constraint of this request (None when unconstrained); 400s fail closed."""
        request = self.constraint_request(model)
        if request is None:
            return None
        spec, backend, param = request
        return await model.constraints.compile(spec, backend, param)

    def processors(self, model: ServedModel) -> list[tuple[Any, list[Any], dict[str, Any]]]:
        """The requested logits processors, resolved against the registry (never imported)."""
        refs = []
        for i, item in enumerate(self.logits_processors or ()):
            ref = ProcessorRef(qualname=item) if isinstance(item, str) else item
            spec = model.logits_processors.get(ref.qualname)
            if spec is None:
                available = ", ".join(sorted(model.logits_processors)) or "none"
                raise bad_request(f"Unknown logits processor {ref.qualname!r}; available: {available}.",
                                  param=f"logits_processors[{i}]")
            refs.append((spec, ref.args, ref.kwargs, i))
        return refs


def instantiate_processors(refs: list, model: ServedModel, extra_args: dict[str, Any] | None) -> tuple[Any, ...]:
    """One fresh instance of each requested processor (per choice: processors may keep state)."""
    context = {"tokenizer": model.tokenizer, "eos_token_ids": tuple(model.eos_token_ids),
               "vocab_size": model.vocab_size, "extra_args": extra_args or {}}
    out = []
    for spec, args, kwargs, i in refs:
        try:
            out.append(build_processor(spec.factory, args, kwargs, context))
        except (TypeError, ValueError) as exc:
            raise bad_request(f"logits processor {spec.qualname!r} rejected its arguments: {exc}",
                              param=f"logits_processors[{i}]") from None
    return tuple(out)


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of candidate ``index``: seeded candidates differ by seed + index."""
    if params.seed is None or index == 0:
        return params
    return attrs.evolve(params, seed=(params.seed + index) % 2**64)


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage
