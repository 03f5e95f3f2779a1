"""``nodigits.NoDigits``: bans every token whose text contains a digit, except the
digits listed in ``keep`` (a string such as ``"7"``).

Request it with ``"logits_processors": ["nodigits.NoDigits"]`` or
``[{"qualname": "nodigits.NoDigits", "kwargs": {"keep": "7"}}]``.
"""

from __future__ import annotations

from typing import Any, Sequence

from patchbay import hookimpl
from patchbay.logits import LogitsProcessor
from patchbay.registry import LogitsProcessorSpec

_BANNED_CACHE: dict[tuple[int, str], Any] = {}


class NoDigits(LogitsProcessor):
    def __init__(self, keep: str = "", *, context: dict[str, Any]):
        if not isinstance(keep, str) or not all(c.isdigit() for c in keep):
            raise ValueError("keep must be a string of digits")
        tokenizer = context["tokenizer"]
        key = (id(tokenizer), keep)
        if key not in _BANNED_CACHE:
            import torch

            banned = [
                i for i in range(len(tokenizer))
                if any(c.isdigit() and c not in keep for c in tokenizer.decode([i]))
            ]
            _BANNED_CACHE[key] = torch.tensor(banned, dtype=torch.long)
        self.banned = _BANNED_CACHE[key]

    @classmethod
    def apply_batch(cls, instances: Sequence["NoDigits"], output_ids, prompt_ids, logits) -> None:
        for row, inst in enumerate(instances):
            if inst.banned.numel():
                logits[row, inst.banned.to(logits.device)] = float("-inf")


@hookimpl
def register_logits_processors(register):
    register(LogitsProcessorSpec("nodigits.NoDigits", NoDigits))
