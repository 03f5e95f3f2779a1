"""Whisper's decoding rules, as one per-sequence logits processor (the engine applies it batched).

The first output tokens may be *forced*: the language (detected: the most likely of
the language tokens, as Whisper's ``detect_language`` picks it), the task and
``<|notimestamps|>``. After them, as transformers' Whisper ``generate`` applies them
and in its order: ``begin_suppress_tokens`` at the first free token,
``suppress_tokens`` always, and with timestamps Whisper's timestamp rules
(``WhisperTimeStampLogitsProcessor``: pairs, never decreasing, a timestamp first and
at most ``max_initial_timestamp_index``, a timestamp whenever timestamps together
are likelier than any text token).
"""

from __future__ import annotations

from typing import Sequence

import attrs
import torch

from patchbay.logits import LogitsProcessor

NEG_INF = float("-inf")
#: a forced slot filled by language detection
DETECT = -1


@attrs.frozen
class RuleTables:
    """The model-wide part of the rules (built once per model)."""

    vocab_size: int
    eos_id: int
    #: first timestamp token (``<|notimestamps|>`` + 1)
    timestamp_begin: int
    no_timestamps_id: int
    max_initial_timestamp_index: int | None
    suppress: torch.Tensor | None
    begin_suppress: torch.Tensor | None
    #: True except at the language tokens
    not_language: torch.Tensor | None

    @classmethod
    def build(cls, vocab_size: int, eos_id: int, no_timestamps_id: int, max_initial: int | None,
              suppress: Sequence[int], begin_suppress: Sequence[int], language_ids: Sequence[int]) -> "RuleTables":
        def mask(ids: Sequence[int]) -> torch.Tensor | None:
            ids = [i for i in ids if 0 <= i < vocab_size]
            if not ids:
                return None
            m = torch.zeros(vocab_size, dtype=torch.bool)
            m[ids] = True
            return m

        lang = mask(language_ids)
        return cls(vocab_size=vocab_size, eos_id=eos_id, timestamp_begin=no_timestamps_id + 1,
                   no_timestamps_id=no_timestamps_id, max_initial_timestamp_index=max_initial,
                   suppress=mask(suppress), begin_suppress=mask(begin_suppress),
                   not_language=None if lang is None else ~lang)


class WhisperRules(LogitsProcessor):
    """The rules for one sequence: ``forced`` output tokens first (``DETECT``: the detected language), then
    the suppressions and, with ``timestamps``, the timestamp rules."""

    def __init__(self, tables: RuleTables, forced: Sequence[int], timestamps: bool):
        self.tables = tables
        self.forced = tuple(forced)
        self.timestamps = timestamps

    def apply(self, output_ids: Sequence[int], prompt_ids: Sequence[int], logits: torch.Tensor) -> None:
        t = self.tables
        n, k = len(output_ids), len(self.forced)
        if n < k:
            token = self.forced[n]
            if token == DETECT:
                token = int(logits.masked_fill(t.not_language.to(logits.device), NEG_INF).argmax())
            logits.fill_(NEG_INF)
            logits[token] = 0.0
            return
        if n == k and t.begin_suppress is not None:
            logits.masked_fill_(t.begin_suppress.to(logits.device), NEG_INF)
        if t.suppress is not None:
            logits.masked_fill_(t.suppress.to(logits.device), NEG_INF)
        if self.timestamps:
            self._timestamp_rules(output_ids[k:], logits)

    def _timestamp_rules(self, seq: Sequence[int], row: torch.Tensor) -> None:
        t = self.tables
        tb = t.timestamp_begin
        row[t.no_timestamps_id] = NEG_INF
        last_ts = len(seq) >= 1 and seq[-1] >= tb
        penultimate_ts = len(seq) < 2 or seq[-2] >= tb
        if last_ts:
            if penultimate_ts:  # a pair just closed: text (or EOS) next
                row[tb:] = NEG_INF
            else:  # a pair is open: a timestamp (or EOS) next
                row[: t.eos_id] = NEG_INF
        stamps = [tok for tok in seq if tok >= tb]
        if stamps:  # never decreasing; <|x|> repeats only to close a pair
            floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
            row[tb:floor] = NEG_INF
        if not seq:  # the first free token is a timestamp, and an early one
            row[:tb] = NEG_INF
            if t.max_initial_timestamp_index is not None:
                row[tb + t.max_initial_timestamp_index + 1 :] = NEG_INF
        logprobs = torch.log_softmax(row.float(), dim=-1)
        if logprobs[tb:].logsumexp(dim=-1) > logprobs[:tb].max():
            row[:tb] = NEG_INF
