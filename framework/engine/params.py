"""What one engine request asks for, and what the engine reports back."""

from __future__ import annotations

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
    #: also decode text as it is generated (off for token-only users)
    detokenize: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
