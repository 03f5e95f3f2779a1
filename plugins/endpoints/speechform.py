"""The multipart form of /v1/audio/transcriptions and /v1/audio/translations: its fields, their parsing from
form strings (strictly: a wrong type, an unknown field or an unsupported value is a 400 naming it), and the
speech job they ask for.

Not a plugin itself; the audio endpoints share it.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import attrs
from litestar import Request
from litestar.exceptions import HTTPException

from patchbay.engine.params import SamplingParams
from patchbay.errors import APIError, bad_request
from patchbay.served import ServedModel
from patchbay.speech import SpeechJob
from patchbay_plugins.endpoints.textgen import check_sampling_values

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
#: formats decoded with segment timestamps
TIMED_FORMATS = ("srt", "verbose_json", "vtt")
GRANULARITIES = ("segment", "word")
#: how streamed chunks look: the reference's ``transcription.chunk`` objects, or OpenAI's events
STREAM_FORMATS = ("vllm", "openai")


@attrs.define(kw_only=True)
class SpeechForm:
    """Form fields of a transcription (``file`` holds the uploaded bytes)."""

    file: bytes
    model: str | None = None
    language: str | None = None
    prompt: str = ""
    response_format: str = "json"
    temperature: float = 0.0
    timestamp_granularities: list[str] = attrs.Factory(list)
    stream: bool = False
    #: patchbay: ``vllm`` (``transcription.chunk`` objects, the default) or ``openai`` (``transcript.text.*``)
    stream_format: str = "vllm"
    stream_include_usage: bool = False
    stream_continuous_usage_stats: bool = False
    seed: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    max_completion_tokens: int | None = None
    vllm_xargs: dict[str, Any] | None = None
    to_language: str | None = None
    use_beam_search: bool = False
    n: int = 1
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    request_id: str | None = None
    priority: int = 0
    #: OpenAI fields of newer models, refused unless neutral
    include: list[str] = attrs.Factory(list)
    chunking_strategy: str | None = None
    hotwords: str | None = None


@attrs.define(kw_only=True)
class TranslationForm(SpeechForm):
    """Form fields of a translation (the same; ``language`` names the spoken language)."""


def _convert(name: str, value: str, tp: Any) -> Any:
    """One form string as the field's type."""
    base = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
    kind = base[0] if len(base) == 1 else str
    try:
        if kind is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1")
        if kind is int:
            return int(value)
        if kind is float:
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError("expected a finite number")
            return out
        if typing.get_origin(kind) is dict:
            out = json.loads(value)
            if not isinstance(out, dict):
                raise ValueError("expected a JSON object")
            return out
    except ValueError as exc:
        raise bad_request(f"Invalid value for '{name}': {exc} (got {value[:50]!r}).", param=name) from None
    return value


def too_large(size: str, max_mb: float) -> APIError:
    return APIError(f"The audio file is {size}; at most {max_mb:g} MiB are accepted (--max-audio-filesize-mb).",
                    status=413, param="file", code="file_too_large")


async def parse_form(request: Request, cls: type[SpeechForm], max_mb: float) -> SpeechForm:
    """The request's multipart form as ``cls``; 400 naming the field on any mistake, 413 for a
    body past the route's limit (``max_mb`` of audio and its form)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise bad_request("The request body must be multipart/form-data with the audio in the field 'file'.",
                          param="file")
    try:
        form = await request.form()
    except APIError:
        raise
    except HTTPException as exc:
        if exc.status_code == 413:
            raise too_large(f"over {max_mb:g} MiB", max_mb) from None
        raise bad_request(f"Malformed multipart form: {exc.detail}.") from None
    except Exception as exc:  # noqa: BLE001 - a malformed body is the client's
        raise bad_request(f"Malformed multipart form: {type(exc).__name__}.") from None
    fields = attrs.fields_dict(cls)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for raw_name, value in form.multi_items():
        name = raw_name[:-2] if raw_name.endswith("[]") else raw_name
        if name not in fields:
            raise bad_request(f"Unrecognized request argument supplied: {raw_name}", param=raw_name)
        if name == "file":
            if isinstance(value, str):
                raise bad_request("'file' must be an uploaded file, not a text field.", param="file")
            if "file" in values:
                raise bad_request("'file' is given twice; send one audio file.", param="file")
            values["file"] = await value.read()
            continue
        if not isinstance(value, str):
            raise bad_request(f"'{name}' must be a text field, not a file.", param=name)
        if typing.get_origin(hints[name]) is list:
            values.setdefault(name, []).append(value)
        elif name in values:
            raise bad_request(f"'{name}' is given twice.", param=name)
        else:
            values[name] = _convert(name, value, hints[name])
    if "file" not in values:
        raise bad_request("No audio: send the file in the multipart field 'file'.", param="file")
    return cls(**values)


def check_form(model: ServedModel, form: SpeechForm, task: str, max_bytes: int) -> None:
    """Every check that needs no audio decoding; 400 (413 for the size) naming the field."""
    facts = model.speech_facts
    if len(form.file) > max_bytes:
        raise too_large(f"{len(form.file) / 2**20:.1f} MiB", max_bytes / 2**20)
    if form.response_format not in RESPONSE_FORMATS:
        raise bad_request(f"response_format must be one of {', '.join(RESPONSE_FORMATS)} "
                          f"(got {form.response_format!r}).", param="response_format")
    if form.language is not None:
        form.language = form.language.strip().lower()
        if form.language not in facts.languages:
            raise bad_request(f"Unsupported language {form.language!r}: this model knows "
                              f"{', '.join(facts.languages)}.", param="language")
    if task == "translate" and not facts.translates:
        raise bad_request(f"The model `{model.names[0]}` cannot translate; it only transcribes.", param="model",
                          code="unsupported_task")
    if form.to_language not in (None, "", "en"):
        raise bad_request("Whisper translates into English only: to_language must be 'en'.", param="to_language")
    bad = [g for g in form.timestamp_granularities if g not in GRANULARITIES]
    if bad:
        raise bad_request(f"timestamp_granularities takes {' and '.join(GRANULARITIES)} (got {bad[0]!r}).",
                          param="timestamp_granularities")
    if form.timestamp_granularities and form.response_format != "verbose_json":
        raise bad_request("timestamp_granularities needs response_format verbose_json.",
                          param="timestamp_granularities")
    if "word" in form.timestamp_granularities and not facts.word_timestamps:
        raise bad_request("This model cannot align words (it has no alignment heads).",
                          param="timestamp_granularities")
    if form.stream and form.response_format in TIMED_FORMATS:
        raise bad_request(f"response_format {form.response_format} cannot be streamed (json or text can).",
                          param="stream")
    for name in ("stream_include_usage", "stream_continuous_usage_stats"):
        if getattr(form, name) and not form.stream:
            raise bad_request("Stream options can only be given with stream=true.", param=name)
    if form.stream_format not in STREAM_FORMATS:
        raise bad_request(f"stream_format must be one of {', '.join(STREAM_FORMATS)}.", param="stream_format")
    if form.priority and model.config.scheduling_policy != "priority":
        raise bad_request("priority needs a server started with --scheduling-policy priority.", param="priority")
    _check_sampling(form)


def _check_sampling(form: SpeechForm) -> None:
    if not 0 <= form.temperature <= 1:
        raise bad_request(f"temperature must be between 0 and 1 (got {form.temperature}).", param="temperature")
    check_sampling_values(form)
    if form.max_completion_tokens is not None and form.max_completion_tokens < 1:
        raise bad_request("max_completion_tokens must be at least 1.", param="max_completion_tokens")
    refused = {"use_beam_search": form.use_beam_search, "n": form.n != 1, "include": bool(form.include),
               "hotwords": bool(form.hotwords), "chunking_strategy": form.chunking_strategy not in (None, "auto"),
               "length_penalty": form.length_penalty != 1.0}
    for name, asked in refused.items():
        if asked:
            raise bad_request(f"'{name}' is not supported by this server.", param=name, code="unsupported_parameter")


def speech_job(form: SpeechForm, task: str) -> SpeechJob:
    """What the form asks the model to do."""
    params = SamplingParams(
        max_tokens=form.max_completion_tokens or 1 << 30, temperature=form.temperature,
        top_p=1.0 if form.top_p is None else form.top_p, top_k=max(form.top_k or 0, 0),
        min_p=form.min_p or 0.0, seed=form.seed, frequency_penalty=form.frequency_penalty or 0.0,
        presence_penalty=form.presence_penalty or 0.0,
        repetition_penalty=1.0 if form.repetition_penalty is None else form.repetition_penalty,
        include_stop_str_in_output=form.include_stop_str_in_output, extra_args=form.vllm_xargs)
    return SpeechJob(task=task, language=form.language, prompt=form.prompt,
                     timestamps=form.response_format in TIMED_FORMATS,
                     word_timestamps="word" in form.timestamp_granularities, params=params, priority=form.priority)
