"""What one engine request asks for, and what the engine reports back."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define(kw_only=True)
class SamplingParams:
    """Per-sequence decoding parameters (already validated by the endpoint)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    #: token id -> additive bias
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    #: each a token-id sequence that must never be completed
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    #: top log-probabilities to return per output token (0: only the sampled one); None: no logprobs
    logprobs: int | None = None
    #: same for prompt tokens (computed at prefill; such requests skip the prefix cache)
    prompt_logprobs: int | None = None
    #: per-sequence logits processor instances, see :mod:`patchbay.logits`
    logits_processors: tuple[Any, ...] = ()
    #: a compiled structured-output constraint (``patchbay.decoding.CompiledConstraint``)
    constraint: Any = None
    #: request-supplied extras (``vllm_xargs``), visible to logits processors
    extra_args: dict[str, Any] | None = None
    #: also report the log-probabilities of exactly these next tokens (generative scoring)
    logprob_token_ids: tuple[int, ...] = ()
    #: also decode text as it is generated (off for token-only users)
    detokenize: bool = True
    #: tokens whose text is never shown, special in the tokenizer or not (a speech model's timestamps)
    hidden_token_ids: frozenset[int] = frozenset()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_processing(self) -> bool:
        """True when the logits of this sequence must pass the processing pipeline."""
        return bool(
            self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.allowed_token_ids is not None
            or self.bad_words_ids
            or self.logits_processors
            or self.constraint is not None
        )


@attrs.define(kw_only=True)
class PoolingParams:
    """What a pooling (encode) request asks for: one vector per prompt, no sampling."""

    #: "embed" (the embedding), "classify" (class probabilities) or "score" (a cross-encoder's score);
    #: see :mod:`patchbay.engine.pooling`
    task: str = "embed"
    #: segment ids for text pairs (BERT's token_type_ids), one per prompt token
    token_type_ids: list[int] | None = None
    #: embed: keep this many leading components (Matryoshka), re-normalised as the model's are
    dimensions: int | None = None


@attrs.define
class TokenLogprob:
    """One position's log-probability: the chosen token and the top alternatives."""

    token_id: int
    logprob: float
    #: (token id, logprob) best first, as many as asked for
    top: list[tuple[int, float]] = attrs.field(factory=list)
    #: rank of the chosen token among all tokens (1 = most likely)
    rank: int = 1
    #: (token id, logprob) of the ids a request named in ``logprob_token_ids``
    requested: list[tuple[int, float]] = attrs.field(factory=list)


@attrs.define
class RequestOutput:
    """One delta of a request's output, delivered to its stream.

    ``token_ids`` and ``text`` are what is new since the previous delta.
    ``finish_reason`` is set on the last delta: ``"stop"`` (EOS, a stop token
    or a stop string; ``stop_reason`` says which string or token id),
    ``"length"`` (max_tokens or the context end), ``"abort"``, or
    ``"error"`` (``error`` holds the message).
    """

    request_id: str
    token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    #: one entry per token in ``token_ids`` when logprobs were asked for
    logprobs: list[TokenLogprob] | None = None
    #: on the first delta, when prompt logprobs were asked for (first entry None: no context)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float = 0.0
    #: character offsets of each new token's text within the whole output text
    text_offsets: list[int] | None = None
    #: pooling requests: the finished float32 output (embedding, probabilities or score), CPU tensor
    pooled: Any = None
    #: requests with encoder inputs, on the last delta: what the model reported when the sequence ended
    #: (``EncoderDecoderModel.finish_request``)
    encoder_result: Any = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
