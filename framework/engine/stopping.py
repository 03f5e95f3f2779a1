"""When a sequence ends — every rule in one place.

- EOS ends it (``finish_reason "stop"``, no text) unless ``ignore_eos``;
- a ``stop_token_ids`` id ends it (``stop_reason`` the id; its text kept only
  with ``include_stop_str_in_output``);
- a stop string ends it where it starts in the text (``stop_reason`` the
  string; kept with ``include_stop_str_in_output``); while the sequence runs,
  the last ``len(longest stop) - 1`` characters are held back so a stop string
  is never half-sent;
- ``min_tokens``: until that many tokens exist, EOS and the stop ids cannot be
  sampled (:func:`held_off_ids`, a logits mask) and stop strings do not count;
- a structured-output constraint ends it when complete (``stop``);
- ``max_tokens`` and the end of the context end it (``length``).

The engine calls :meth:`Stopper.after_token` for every sampled token; the
logits pipeline calls :func:`held_off_ids`; beam search (which expands one
token per engine request) calls :func:`token_stop`.
"""

from __future__ import annotations

from typing import Any, Iterable

from patchbay.engine.params import SamplingParams


def token_stop(params: SamplingParams, eos_ids: frozenset[int], token: int) -> tuple[str | None, int | None, bool]:
    """``(finish_reason, stop_reason, keep_text)`` for a token by its id alone (EOS, stop ids)."""
    if not params.ignore_eos and token in eos_ids:
        return "stop", None, False
    if token in params.stop_token_ids:
        return "stop", token, params.include_stop_str_in_output
    return None, None, True


def held_off_ids(params: SamplingParams, eos_ids: Iterable[int], num_output: int, vocab: int) -> list[int]:
    """The ids that may not be sampled yet: EOS (unless ignored) and stop ids, before ``min_tokens``."""
    if num_output >= params.min_tokens:
        return []
    ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    return [t for t in ids if t < vocab]


def holdback(params: SamplingParams) -> int:
    """Characters kept back from a running stream so that a stop string is never half-sent."""
    return max((len(s) for s in params.stop), default=1) - 1


def find_stop_string(params: SamplingParams, text: str, start: int) -> tuple[int, str] | None:
    """``(where the text ends, stop string)`` for the earliest stop string that may have been completed by
    text added at ``start`` (a stop string may begin up to ``len - 1`` characters before it)."""
    search_from = max(0, start - holdback(params))
    best: tuple[int, str] | None = None
    for stop in params.stop:
        pos = text.find(stop, search_from)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is None:
        return None
    pos, stop = best
    return (pos + len(stop) if params.include_stop_str_in_output else pos), stop


class Stopper:
    """Applies the rules above to one engine's sequences."""

    def __init__(self, eos_ids: Iterable[int], max_model_len: int):
        self.eos_ids = frozenset(eos_ids)
        self.max_model_len = max_model_len

    def after_token(self, seq: Any, token: int) -> str | None:
        """Account ``token`` (already appended) to ``seq``: its text, and the finish reason if it ends here."""
        params = seq.params
        finish, reason, keep_text = token_stop(params, self.eos_ids, token)
        if reason is not None:
            seq.stop_reason = reason
        if finish is None and seq.matcher is not None:
            if not seq.matcher.advance(token):
                finish = "length"  # cannot happen with a correct mask; never report a violation as "stop"
            elif seq.matcher.is_terminated():
                finish = "stop"
        detok = seq.detok
        if detok is not None:
            seq.pending_offsets.append(len(detok.text))
            if keep_text:
                start = detok.add(token)
                if params.stop and seq.num_output >= params.min_tokens and start < len(detok.text):
                    hit = find_stop_string(params, detok.text, start)
                    if hit is not None:
                        detok.cut(hit[0])
                        if finish is None:
                            finish, seq.stop_reason = "stop", hit[1]
        if finish is None and (seq.num_output >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            finish = "length"
        return finish
