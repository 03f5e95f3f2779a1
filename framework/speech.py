"""Speech to text on a served encoder-decoder model: audio windows through its processor and the engine.

:func:`transcribe` cuts a waveform into the model's windows (30 s for Whisper;
cuts fall at the quietest moment of each window's last second) and runs them one
after another, each window's text continuing the one before (it is the next
window's previous text, as Whisper conditions on it). Each window's decoder runs
on the shared engine like any other sequence; the encoder runs once per window
inside the engine. It yields :class:`TextDelta` as text is generated and one
:class:`Transcript` at the end. Endpoints only turn these into wire formats.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import TYPE_CHECKING, AsyncIterator

import attrs

from patchbay.audio import Waveform, split_windows
from patchbay.engine.params import SamplingParams
from patchbay.errors import APIError
from patchbay.model import SpeechWindow

if TYPE_CHECKING:
    from patchbay.served import ServedModel


@attrs.frozen
class SpeechJob:
    """What one transcription or translation asks for."""

    #: ``"transcribe"`` or ``"translate"``
    task: str = "transcribe"
    #: the spoken language (None: the model detects it on the first window)
    language: str | None = None
    #: previous text for the first window (Whisper's prompt)
    prompt: str = ""
    #: decode segment timestamps
    timestamps: bool = False
    #: align words with the audio
    word_timestamps: bool = False
    #: sampling (``max_tokens``: per window, at most the rest of the decoder's context); a seeded request
    #: seeds window ``i`` with ``seed + i``
    params: SamplingParams = attrs.field(factory=lambda: SamplingParams(max_tokens=1 << 30, temperature=0.0))
    #: the engine's admission priority (lower first; ``--scheduling-policy priority``)
    priority: int = 0


@attrs.frozen
class TextDelta:
    """New text of the transcript (and its tokens), in order."""

    text: str
    token_ids: tuple[int, ...]
    #: prompt tokens of the windows started so far (for running usage)
    prompt_tokens: int = 0


@attrs.frozen
class Segment:
    id: int
    #: where its window starts, in mel frames (10 ms), as Whisper reports ``seek``
    seek: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float | None = None


@attrs.frozen
class Word:
    word: str
    start: float
    end: float


@attrs.frozen
class Transcript:
    text: str
    #: the language spoken, told or detected
    language: str | None
    #: seconds of audio
    duration: float
    segments: tuple[Segment, ...]
    words: tuple[Word, ...]
    #: decoder prompt tokens and output tokens over all windows
    prompt_tokens: int
    completion_tokens: int
    #: the last window's: ``"stop"`` or ``"length"``
    finish_reason: str | None
    stop_reason: int | str | None = None


def compression_ratio(text: str) -> float:
    """How well the text compresses (Whisper's hallucination signal: above 2.4 is suspect)."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


async def transcribe(model: ServedModel, request_id: str, audio: Waveform,
                     job: SpeechJob) -> AsyncIterator[TextDelta | Transcript]:
    """Transcribe (or translate) ``audio`` window after window; see the module docstring. Leaving the
    iteration early aborts the window running on the engine."""
    speech = model.speech
    if speech is None:
        raise APIError(f"The model `{model.names[0]}` does not transcribe audio.", status=400, param="model")
    import torch

    facts = speech.facts
    rate = audio.sampling_rate
    language = job.language
    previous: tuple[int, ...] = ()
    texts: list[str] = []
    segments: list[Segment] = []
    words: list[Word] = []
    prompt_tokens = completion_tokens = 0
    finish: str | None = None
    stop_reason: int | str | None = None
    for index, (a, b) in enumerate(split_windows(audio.samples, rate, facts.window_seconds)):
        window = SpeechWindow(waveform=torch.from_numpy(audio.samples[a:b]), task=job.task, language=language,
                              prompt=job.prompt, previous_ids=previous, timestamps=job.timestamps,
                              word_timestamps=job.word_timestamps)
        start = await asyncio.to_thread(speech.start, window)
        room = model.max_model_len - len(start.prompt_ids)
        if room < 1:
            raise APIError("The prompt leaves no room for output in the model's decoder context.", param="prompt")
        forced = start.forced_outputs  # the prompt's continuation (a detected language, the task), not text
        params = attrs.evolve(
            job.params, max_tokens=min(job.params.max_tokens + forced, room), logits_processors=start.logits_processors,
            hidden_token_ids=start.hidden_token_ids, logprobs=0 if job.timestamps else job.params.logprobs,
            seed=None if job.params.seed is None else job.params.seed + index)
        output: list[int] = []
        logprobs: list[float] = []
        text = ""
        result = None
        async for out in model.engine.generate(f"{request_id}-w{index}", start.prompt_ids, params,
                                               priority=job.priority, encoder_input=start.encoder_input):
            if out.finish_reason in ("error", "abort"):
                raise APIError(out.error or "the engine stopped", status=500, type="server_error")
            new = tuple(out.token_ids[max(forced - len(output), 0):])
            output += out.token_ids
            logprobs += [e.logprob for e in out.logprobs or ()]
            text += out.text
            if out.text or new:
                yield TextDelta(out.text, new, prompt_tokens + len(start.prompt_ids) + min(forced, len(output)))
            if out.finished:
                finish, stop_reason, result = out.finish_reason, out.stop_reason, out.encoder_result
        read = speech.finish(window, output, result)
        language = language or read.language
        previous += read.text_ids
        prompt_tokens += len(start.prompt_ids) + min(forced, len(output))
        completion_tokens += max(len(output) - forced, 0)
        offset = a / rate
        for seg in read.segments:
            lps = [logprobs[p] for p in seg.output_positions if p < len(logprobs)]
            segments.append(Segment(
                id=len(segments), seek=round(offset * 100), start=round(offset + seg.start, 3),
                end=round(offset + seg.end, 3), text=seg.text, tokens=seg.token_ids,
                temperature=params.temperature, avg_logprob=sum(lps) / len(lps) if lps else 0.0,
                compression_ratio=compression_ratio(seg.text)))
        words += [Word(w.word, round(offset + w.start, 3), round(offset + w.end, 3)) for w in read.words]
        texts.append("".join(seg.text for seg in read.segments) if job.timestamps else text)
    yield Transcript(text="".join(texts), language=language, duration=audio.duration, segments=tuple(segments),
                     words=tuple(words), prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     finish_reason=finish, stop_reason=stop_reason)
