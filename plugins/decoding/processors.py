"""Builtin logits processors, requestable by qualname:

- ``patchbay.no_repeat_ngram`` (``n``): never complete an n-gram that already
  occurs in the prompt + output (like transformers' ``no_repeat_ngram_size``);
- ``patchbay.length_limit`` (``max_tokens``, ``ramp=0``): a token-count limiter
  that forces EOS once the output has ``max_tokens`` tokens (after ``ramp``
  tokens of rising EOS bias before that);
- ``patchbay.force_prefix`` (``text`` or ``token_ids``): forces the output to
  start with a given token sequence, then lets the model continue.
"""

from __future__ import annotations

from typing import Any, Sequence

from patchbay import hookimpl
from patchbay.logits import LogitsProcessor
from patchbay.registry import LogitsProcessorSpec


class NoRepeatNGram(LogitsProcessor):
    def __init__(self, n: int):
        if not isinstance(n, int) or n < 1:
            raise ValueError("n must be a positive integer")
        self.n = n

    def apply(self, output_ids: Sequence[int], prompt_ids: Sequence[int], logits) -> None:
        tokens = list(prompt_ids) + list(output_ids)
        n = self.n
        if len(tokens) < n - 1:
            return
        prefix = tuple(tokens[len(tokens) - (n - 1):]) if n > 1 else ()
        banned = {
            tokens[i + n - 1]
            for i in range(len(tokens) - n + 1)
            if tuple(tokens[i : i + n - 1]) == prefix
        }
        if banned:
            import torch

            logits[torch.tensor(sorted(banned), device=logits.device)] = float("-inf")


class LengthLimit(LogitsProcessor):
    def __init__(self, max_tokens: int, ramp: int = 0, *, context: dict[str, Any]):
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if not isinstance(ramp, int) or ramp < 0:
            raise ValueError("ramp must be a non-negative integer")
        eos = list(context["eos_token_ids"])
        if not eos:
            raise ValueError("the served model has no EOS token to force")
        self.max_tokens, self.ramp, self.eos = max_tokens, ramp, eos[0]

    def apply(self, output_ids: Sequence[int], prompt_ids: Sequence[int], logits) -> None:
        n = len(output_ids)
        if n >= self.max_tokens:
            logits.fill_(float("-inf"))
            logits[self.eos] = 0.0
        elif self.ramp and n >= self.max_tokens - self.ramp:
            logits[self.eos] += 4.0 * (n - (self.max_tokens - self.ramp) + 1)


class ForcePrefix(LogitsProcessor):
    def __init__(self, text: str | None = None, token_ids: list[int] | None = None, *, context: dict[str, Any]):
        if (text is None) == (token_ids is None):
            raise ValueError("give exactly one of text or token_ids")
        if text is not None:
            token_ids = context["tokenizer"].encode(text, add_special_tokens=False)
        if not token_ids or not all(isinstance(t, int) and 0 <= t < context["vocab_size"] for t in token_ids):
            raise ValueError("token_ids must be a non-empty list of token ids of this model")
        self.forced = list(token_ids)

    def apply(self, output_ids: Sequence[int], prompt_ids: Sequence[int], logits) -> None:
        n = len(output_ids)
        if n < len(self.forced):
            token = self.forced[n]
            logits.fill_(float("-inf"))
            logits[token] = 0.0


@hookimpl
def register_logits_processors(register):
    register(LogitsProcessorSpec("patchbay.no_repeat_ngram", NoRepeatNGram))
    register(LogitsProcessorSpec("patchbay.length_limit", LengthLimit))
    register(LogitsProcessorSpec("patchbay.force_prefix", ForcePrefix))
