"""POST /v1/audio/transcriptions and /v1/audio/translations — OpenAI's speech to text, with vLLM's extras.

The form is :mod:`speechform`'s. Answers by ``response_format``: ``json``
(``{"text", "usage"}``), ``text`` (text/plain), ``srt`` and ``vtt`` (cues from
the segments), ``verbose_json`` (``task``, ``language``, ``duration``, ``text``,
``segments``, and ``words`` with ``timestamp_granularities[]=word``). With
``stream=true``: server-sent events, the reference's ``transcription.chunk``
objects (``stream_format=vllm``, the default; ``translation.chunk`` for
translations) or OpenAI's ``transcript.text.delta`` / ``transcript.text.done``
events (``stream_format=openai``).
"""

from __future__ import annotations

import math
import time
from typing import Any, AsyncIterator

from litestar import Request, Response, post
from litestar.response import Stream

from patchbay import hookimpl
from patchbay.serving import Serving, ServingDep
from patchbay.speech import Transcript
from patchbay_plugins.endpoints.speechform import SpeechForm, TranslationForm, check_form, parse_form, speech_job
from patchbay_plugins.endpoints.streaming import SSE_DONE, SSE_HEADERS, error_in_stream, sse, until_disconnect

#: the audio routes take multipart forms, as the openai client sends files (a url-encoded form cannot carry
#: one: it is a 415, like JSON)
FORM_TYPES = ("multipart/form-data",)
#: the most a form may carry around its file (field values, part headers, boundaries)
FORM_SLACK = 2**20
TASKS = {"transcribe": ("trsc", "transcription.chunk"), "translate": ("trsl", "translation.chunk")}


# --------------------------------------------------------------------------- response formats


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(result: Transcript, kind: str) -> str:
    """SRT or WebVTT cues, one per segment with text, in order; a cue lasts at least a millisecond (WebVTT
    wants its end after its start: audio shorter than that still gets a well-formed cue)."""
    cues = [seg for seg in result.segments if seg.text.strip()]
    sep = "," if kind == "srt" else "."
    blocks = []
    for i, seg in enumerate(cues, 1):
        times = f"{_clock(seg.start, sep)} --> {_clock(max(seg.end, seg.start + 0.001), sep)}"
        text = seg.text.strip().replace("-->", "->")
        blocks.append(f"{i}\n{times}\n{text}\n" if kind == "srt" else f"{times}\n{text}\n")
    if kind == "vtt":
        return "WEBVTT\n\n" + "\n".join(blocks)
    return "\n".join(blocks)


def verbose(result: Transcript, task: str, words: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": task, "language": result.language, "duration": round(result.duration, 3), "text": result.text,
        "segments": [
            {"id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text, "tokens": list(s.tokens),
             "temperature": s.temperature, "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
             "no_speech_prob": s.no_speech_prob}
            for s in result.segments],
        "usage": {"type": "duration", "seconds": math.ceil(result.duration)},
    }
    if words:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in result.words]
    return body


def usage(result: Transcript) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


# --------------------------------------------------------------------------- streams


async def _vllm_chunks(events: AsyncIterator[Any], form: SpeechForm, rid: str, name: str, obj: str) -> AsyncIterator[bytes]:
    created = int(time.time())
    completion = 0

    def chunk(choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices}
        if use is not None:
            body["usage"] = use
        return sse(body)

    async for event in events:
        if isinstance(event, Transcript):
            last = {"delta": {"content": ""}, "finish_reason": event.finish_reason, "stop_reason": event.stop_reason}
            use = usage(event)
            yield chunk([last], use if form.stream_continuous_usage_stats else None)
            if form.stream_include_usage:
                yield chunk([], use)
            continue
        completion += len(event.token_ids)
        if not event.text:
            continue
        prompt = event.prompt_tokens
        running = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        yield chunk([{"delta": {"content": event.text}, "finish_reason": None, "stop_reason": None}],
                    running if form.stream_continuous_usage_stats else None)
    yield SSE_DONE


async def _openai_events(events: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    async for event in events:
        if isinstance(event, Transcript):
            yield sse({"type": "transcript.text.done", "text": event.text, "logprobs": None, "usage": {
                "type": "tokens", "input_tokens": event.prompt_tokens, "output_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}})
        elif event.text:
            yield sse({"type": "transcript.text.delta", "delta": event.text, "logprobs": None})
    yield SSE_DONE


# --------------------------------------------------------------------------- the routes


async def speech_to_text(request: Request, serving: Serving, task: str, form_type: type[SpeechForm]) -> Response:
    form = await parse_form(request, form_type, serving.config.max_audio_filesize_mb)
    model, name = serving.resolve(form.model)
    model.require_task("transcription")
    check_form(model, form, task, int(serving.config.max_audio_filesize_mb * 2**20))
    prefix, obj = TASKS[task]
    rid, engine_rid, headers = serving.request_ids(request, form.request_id, prefix)
    job = speech_job(form, task)
    audio = await model.decode_audio(form.file)
    serving.log_request(rid, 0, job)
    events = model.transcribe(engine_rid, audio, job)
    if form.stream:
        body = _openai_events(events) if form.stream_format == "openai" else _vllm_chunks(events, form, rid, name, obj)
        return Stream(error_in_stream(body), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    async def collect() -> Transcript:
        result = None
        async for event in events:
            if isinstance(event, Transcript):
                result = event
        assert result is not None
        return result

    result = await until_disconnect(request, collect())
    fmt = form.response_format
    if fmt == "text":
        return Response(content=result.text, media_type="text/plain", headers=headers)
    if fmt in ("srt", "vtt"):
        return Response(content=subtitles(result, fmt), media_type="text/plain", headers=headers)
    if fmt == "verbose_json":
        body = verbose(result, task, "word" in form.timestamp_granularities)
    else:
        body = {"text": result.text}
        if task == "transcribe":
            body["usage"] = {"type": "duration", "seconds": math.ceil(result.duration)}
    return Response(content=body, media_type="application/json", headers=headers)


def max_body(config) -> int:
    """The largest body the audio routes take: a file of ``--max-audio-filesize-mb`` and its form."""
    return int(config.max_audio_filesize_mb * 2**20) + FORM_SLACK


ROUTE_OPT = {"content_types": FORM_TYPES, "max_body": max_body}


@post("/v1/audio/transcriptions", status_code=200, opt={"body": SpeechForm, **ROUTE_OPT})
async def create_transcription(request: Request, serving: ServingDep) -> Response:
    return await speech_to_text(request, serving, "transcribe", SpeechForm)


@post("/v1/audio/translations", status_code=200, opt={"body": TranslationForm, **ROUTE_OPT})
async def create_translation(request: Request, serving: ServingDep) -> Response:
    return await speech_to_text(request, serving, "translate", TranslationForm)


@hookimpl
def register_routes(register):
    register(create_transcription)
    register(create_translation)
