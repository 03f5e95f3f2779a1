"""The Whisper family's :class:`~patchbay.model.SpeechProcessor`: prompts, decoding rules, reading outputs.

A window's decoder prompt is Whisper's: ``<|startofprev|>`` and the previous text
(the request's ``prompt`` as transformers' ``get_prompt_ids`` tokenizes it, then the
text of the windows before, the last ``max_target_positions // 2 - 1`` tokens)
when there is any, ``<|startoftranscript|>``, the language, the task and, without
timestamps, ``<|notimestamps|>``. When no language is given, the decoder's first
output token is forced to the likeliest language token (Whisper's language
detection on the same window) and the task tokens follow as forced outputs, so
the prompt the model sees is the same as when the language is given.
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import attrs
import torch

from patchbay.model import DecoderStart, SpeechFacts, SpeechSegment, SpeechWindow, SpeechWord, WindowResult
from patchbay_plugins.models.whisper.alignment import SECONDS_PER_POSITION
from patchbay_plugins.models.whisper.features import LogMel
from patchbay_plugins.models.whisper.rules import DETECT, RuleTables, WhisperRules

#: languages written without spaces between words (split into words by characters, as Whisper does)
_UNSPACED = {"zh", "ja", "th", "lo", "my", "yue"}


@attrs.frozen
class WhisperInput:
    """What the encoder takes for one window, and what the decoder should record for it."""

    #: ``[num_mel_bins, 3000]`` float32 log-mel features
    features: torch.Tensor
    #: mel frames that hold audio
    num_frames: int
    #: record the alignment heads' cross-attention from this decoder position on (word timestamps), or None
    record_from: int | None = None


class WhisperSpeech:
    """Prompts and output reading for one Whisper folder (its tokenizer and generation_config)."""

    def __init__(self, tokenizer: Any, gen: dict[str, Any], pre: dict[str, Any], vocab_size: int,
                 max_target_positions: int):
        self.tokenizer = tokenizer
        self.logmel = LogMel(pre)
        self.max_target_positions = max_target_positions
        tok = tokenizer.convert_tokens_to_ids

        def token(key: str, name: str) -> int:
            value = gen.get(key)
            return int(value) if value is not None else int(tok(name))

        self.sot = token("decoder_start_token_id", "<|startoftranscript|>")
        eos = gen.get("eos_token_id", tokenizer.eos_token_id)
        self.eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
        self.no_timestamps = token("no_timestamps_token_id", "<|notimestamps|>")
        self.prev_sot = token("prev_sot_token_id", "<|startofprev|>")
        self.timestamp_begin = self.no_timestamps + 1
        self.lang_to_id = {name[2:-2]: int(i) for name, i in (gen.get("lang_to_id") or {}).items()}
        self.id_to_lang = {i: code for code, i in self.lang_to_id.items()}
        self.task_to_id = {k: int(v) for k, v in (gen.get("task_to_id") or {}).items()}
        self.multilingual = bool(gen.get("is_multilingual", bool(self.lang_to_id)))
        heads = gen.get("alignment_heads") or []
        self.alignment_heads = [(int(layer), int(head)) for layer, head in heads]
        self.tables = RuleTables.build(
            vocab_size, self.eos, self.no_timestamps, gen.get("max_initial_timestamp_index"),
            gen.get("suppress_tokens") or [], gen.get("begin_suppress_tokens") or [], list(self.lang_to_id.values()))
        self.hidden = frozenset(range(self.timestamp_begin, vocab_size))
        self.facts = SpeechFacts(
            sampling_rate=self.logmel.sampling_rate, window_seconds=float(self.logmel.chunk_length),
            languages=tuple(self.lang_to_id) if self.multilingual else ("en",),
            translates=self.multilingual and "translate" in self.task_to_id,
            timestamps=True, word_timestamps=bool(self.alignment_heads),
        )

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, text: str) -> list[int]:
        """The request's prompt as Whisper's previous text (transformers' ``get_prompt_ids``, without its
        ``<|startofprev|>``)."""
        if not text.strip():
            return []
        return list(self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])

    def forced_and_prompt(self, window: SpeechWindow) -> tuple[list[int], list[int]]:
        """``(decoder prompt, forced output tokens)`` of a window."""
        previous = self.prompt_ids(window.prompt) + list(window.previous_ids)
        previous = previous[len(previous) - min(len(previous), self.max_target_positions // 2 - 1):]
        prompt = ([self.prev_sot, *previous] if previous else []) + [self.sot]
        forced: list[int] = []
        if self.multilingual:
            if window.language is None:
                forced.append(DETECT)
            else:
                prompt.append(self.lang_to_id[window.language])
            (forced if forced else prompt).append(self.task_to_id[window.task])
        if not window.timestamps:
            (forced if forced else prompt).append(self.no_timestamps)
        return prompt, forced

    def start(self, window: SpeechWindow) -> DecoderStart:
        prompt, forced = self.forced_and_prompt(window)
        wave = window.waveform
        record = len(prompt) + len(forced) if window.word_timestamps and self.alignment_heads else None
        encoder_input = WhisperInput(features=self.logmel(wave), num_frames=self.logmel.num_frames(wave.shape[0]),
                                     record_from=record)
        rules = WhisperRules(self.tables, forced, timestamps=window.timestamps)
        return DecoderStart(prompt_ids=prompt, encoder_input=encoder_input, logits_processors=(rules,),
                            hidden_token_ids=self.hidden, forced_outputs=len(forced))

    # ------------------------------------------------------------------ reading the output

    def finish(self, window: SpeechWindow, output_ids: Sequence[int], encoder_result: Any) -> WindowResult:
        _, forced = self.forced_and_prompt(window)
        k = min(len(forced), len(output_ids))
        language = window.language
        if forced and forced[0] == DETECT and output_ids:
            language = self.id_to_lang.get(output_ids[0], language)
        free = [t for t in output_ids[k:] if t != self.eos]
        positions = [k + i for i, t in enumerate(output_ids[k:]) if t < self.eos]  # text tokens only
        text_ids = tuple(output_ids[p] for p in positions)
        duration = window.waveform.shape[0] / self.logmel.sampling_rate
        segments = self._segments(free, k, duration) if window.timestamps else (
            SpeechSegment(0.0, duration, self.decode(text_ids), text_ids, tuple(positions)),)
        words: tuple[SpeechWord, ...] = ()
        if window.word_timestamps and encoder_result is not None:
            words = self._words(output_ids, positions, k, list(encoder_result), duration, language)
        return WindowResult(language=language if self.multilingual else "en", text_ids=text_ids,
                            segments=segments, words=words)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _segments(self, free: list[int], offset: int, duration: float) -> tuple[SpeechSegment, ...]:
        """Text runs between timestamp tokens, timed by them, made to tile the window: times past the audio
        are scaled into it, each segment starts where the one before ended and the last ends at
        ``duration``; a run left with no time of its own joins its neighbour (empty runs are dropped)."""
        runs: list[tuple[float, list[int], list[int]]] = []  # (end time or -1, tokens, output positions)
        ids: list[int] = []
        pos: list[int] = []
        for i, t in enumerate(free):
            if t >= self.timestamp_begin:
                if ids:
                    runs.append(((t - self.timestamp_begin) * SECONDS_PER_POSITION, ids, pos))
                    ids, pos = [], []
            elif t < self.eos:
                ids.append(t)
                pos.append(offset + i)
        if ids:
            runs.append((-1.0, ids, pos))
        if not runs:
            return (SpeechSegment(0.0, duration, "", (), ()),)
        latest = max(end for end, _, _ in runs)
        scale = duration / latest if latest > duration else 1.0
        merged: list[tuple[float, list[int], list[int]]] = []
        for n, (end, seg_ids, seg_pos) in enumerate(runs):
            end = duration if n == len(runs) - 1 or end < 0 else min(end * scale, duration)
            if merged and end <= merged[-1][0]:  # no time of its own: one segment with the one before
                merged[-1] = (merged[-1][0], merged[-1][1] + seg_ids, merged[-1][2] + seg_pos)
            elif merged and merged[-1][0] <= 0:  # the first had no time: it joins this one
                merged[-1] = (end, merged[-1][1] + seg_ids, merged[-1][2] + seg_pos)
            else:
                merged.append((end, seg_ids, seg_pos))
        if merged[-1][0] < duration:
            merged[-1] = (duration, merged[-1][1], merged[-1][2])
        out, start = [], 0.0
        for end, seg_ids, seg_pos in merged:
            out.append(SpeechSegment(start, end, self.decode(seg_ids), tuple(seg_ids), tuple(seg_pos)))
            start = end
        return tuple(out)

    def _words(self, output_ids: Sequence[int], positions: list[int], k: int, times: list[float],
               duration: float, language: str | None) -> tuple[SpeechWord, ...]:
        """Words of the text tokens, timed by the token times (``times[m]``: output token ``k + m``): a word
        spans from its first token's time to the next token's."""

        def at(p: int) -> float:
            m = p - k
            value = times[m] if 0 <= m < len(times) else (times[-1] if times and m >= 0 else 0.0)
            return min(max(value, 0.0), duration)

        words: list[SpeechWord] = []
        for word, word_positions in self._split_words(output_ids, positions, language in _UNSPACED):
            start = at(word_positions[0])
            end = max(at(word_positions[-1] + 1), start)
            if words:
                start = max(start, words[-1].start)
            words.append(SpeechWord(word, start, max(end, start)))
        return tuple(words)

    def _split_words(self, output_ids: Sequence[int], positions: list[int],
                     unspaced: bool) -> list[tuple[str, list[int]]]:
        """Group text tokens into words (Whisper's ``split_to_word_tokens``): tokens first joined into whole
        characters, then a new word at a leading space or a punctuation mark (or at every character, for
        languages written without spaces)."""
        pieces: list[tuple[str, list[int]]] = []
        current: list[int] = []
        for p in positions:
            current.append(p)
            text = self.decode([output_ids[q] for q in current])
            if "\ufffd" not in text:
                pieces.append((text, current))
                current = []
        if current:
            pieces.append((self.decode([output_ids[q] for q in current]), current))
        words: list[tuple[str, list[int]]] = []
        for text, group in pieces:
            if unspaced or not words or text.startswith(" ") or text.strip() in string.punctuation:
                words.append((text, list(group)))
            else:
                words[-1] = (words[-1][0] + text, words[-1][1] + group)
        return [(w.strip(), g) for w, g in words if w.strip()]
