"""/v1/audio/transcriptions and /translations in-process: every container, sample rate and channel count;
every response format; streaming in both event styles; long audio; every error in the envelope."""

from __future__ import annotations

import re

import numpy as np
import pytest

from apikit import api_client, assert_error, sse_events
from patchbay.audio import decode_audio, split_windows
from speechkit import FORMATS, RATE, as_pcm16, clip, encode, oracle, post_audio, wav

PLUGINS = ("audio", "models", "whisper", "llama", "completions")


@pytest.fixture(scope="module")
def client(tiny_whisper):
    with api_client(tiny_whisper, max_model_len=None, plugins=PLUGINS) as c:
        yield c


# --------------------------------------------------------------------------- audio in


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_container_decodes_to_the_clip(fmt):
    samples = clip(1, 2.5)
    got = decode_audio(encode(samples, RATE, fmt), RATE).samples
    lag = 0
    if fmt == "m4a":  # AAC's encoder delay (priming samples) is not trimmed by every demuxer
        lags = range(0, 2049)
        lag = max(lags, key=lambda k: float(np.dot(samples[: 8000], got[k:k + 8000])))
    n = min(len(samples), len(got) - lag)
    assert abs(len(got) - lag - len(samples)) < 0.08 * RATE
    corr = np.corrcoef(samples[:n], got[lag:lag + n])[0, 1]
    assert corr > (0.999 if fmt in ("wav", "flac") else 0.95), corr


def test_stereo_is_the_mean_of_its_channels_and_any_rate_is_resampled():
    import io

    import soundfile as sf
    import soxr

    left, right = clip(2, 1.0, 44100), 0.5 * clip(3, 1.0, 44100)
    data = encode(np.stack([left, right], axis=1), 44100, "wav")
    got = decode_audio(data, RATE).samples
    stored, _ = sf.read(io.BytesIO(data), dtype="float32")
    want = soxr.resample(stored.mean(axis=1, dtype=np.float32), 44100, RATE, quality="HQ")
    assert got.shape == want.shape == (RATE,) and np.abs(got - want).max() < 1e-6
    assert np.abs(got - soxr.resample(stored[:, 0], 44100, RATE, quality="HQ")).max() > 0.01  # not one channel
    mono = decode_audio(encode(clip(4, 1.0, 8000), 8000, "flac"), RATE)
    assert mono.sampling_rate == RATE and abs(mono.duration - 1.0) < 1e-3


def test_long_audio_splits_at_quiet_moments_within_windows():
    samples = clip(5, 75.0)
    samples[int(29.5 * RATE):int(29.6 * RATE)] = 0
    windows = split_windows(samples, RATE, 30.0)
    assert windows[0][0] == 0 and windows[-1][1] == len(samples)
    assert all(b - a <= 30 * RATE for a, b in windows) and all(w[1] == v[0] for w, v in zip(windows, windows[1:]))
    assert 29.5 * RATE <= windows[0][1] <= 29.6 * RATE


# --------------------------------------------------------------------------- response formats


def test_json_text_and_every_container_give_the_same_transcript(client, tiny_whisper):
    samples = as_pcm16(clip(6, 3.0))
    want = oracle(tiny_whisper).text(samples, task="transcribe", language="en")
    r = post_audio(client, wav(samples), language="en")
    assert r.status_code == 200, r.text
    assert r.json() == {"text": want, "usage": {"type": "duration", "seconds": 3}}
    r = post_audio(client, wav(samples), language="en", response_format="text")
    assert r.headers["content-type"].startswith("text/plain") and r.text == want
    for fmt in ("flac", "ogg", "m4a", "webm", "mp3"):
        r = post_audio(client, encode(samples, RATE, fmt), name=FORMATS[fmt], language="en")
        assert r.status_code == 200 and isinstance(r.json()["text"], str), (fmt, r.text)


def _check_segments(segments, duration):
    assert segments and segments[0]["start"] == 0 and segments[-1]["end"] == pytest.approx(duration, abs=1e-3)
    for a, b in zip(segments, segments[1:]):
        assert a["end"] == b["start"] and a["start"] < a["end"], (a, b)
    assert [s["id"] for s in segments] == list(range(len(segments)))


def test_verbose_json_segments_tile_the_audio_and_words_are_timed(client):
    samples = clip(7, 5.0)
    r = post_audio(client, wav(samples), response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "transcribe" and body["duration"] == 5.0 and isinstance(body["language"], str)
    _check_segments(body["segments"], 5.0)
    assert body["text"] == "".join(s["text"] for s in body["segments"])
    for s in body["segments"]:
        assert set(s) >= {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                          "compression_ratio", "no_speech_prob"} and s["avg_logprob"] <= 0
    words = body["words"]
    assert words and " ".join(w["word"] for w in words).split() == body["text"].split()
    assert all(0 <= w["start"] <= w["end"] <= 5.0 for w in words)
    assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:]))
    plain = post_audio(client, wav(samples), response_format="verbose_json").json()
    assert "words" not in plain and plain["segments"] == body["segments"]


@pytest.mark.parametrize("kind, seconds", [("srt", 6.0), ("vtt", 6.0), ("vtt", 1 / RATE)])
def test_subtitles_are_well_formed_ordered_and_together_the_transcript(client, kind, seconds):
    samples = clip(8, seconds)
    text = post_audio(client, wav(samples), response_format=kind).text
    verbose = post_audio(client, wav(samples), response_format="verbose_json").json()
    sep = "," if kind == "srt" else r"\."
    stamp = rf"(\d\d):(\d\d):(\d\d){sep}(\d\d\d)"
    if kind == "vtt":
        assert text.startswith("WEBVTT\n\n")
        text = text[len("WEBVTT\n\n"):]
    blocks = [b for b in text.split("\n\n") if b.strip()]
    times, lines = [], []
    for i, block in enumerate(blocks, 1):
        rows = block.strip("\n").split("\n")
        if kind == "srt":
            assert rows.pop(0) == str(i)
        m = re.fullmatch(rf"{stamp} --> {stamp}", rows[0])
        assert m, rows[0]
        g = [int(x) for x in m.groups()]
        start, end = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000, g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        assert 0 <= start < end <= max(seconds, 0.001)
        times.append((start, end))
        lines.append(" ".join(rows[1:]))
    assert all(a[1] <= b[0] for a, b in zip(times, times[1:]))
    assert " ".join(lines).split() == verbose["text"].split()


# --------------------------------------------------------------------------- streaming


def test_streamed_chunks_join_to_the_text_with_usage(client):
    samples = clip(9, 3.0)
    want = post_audio(client, wav(samples), language="en").json()["text"]
    r = post_audio(client, wav(samples), language="en", stream=True, stream_include_usage=True)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "transcription.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == want
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_continuous_usage_counts_on_every_chunk(client):
    events = sse_events(post_audio(client, wav(clip(9, 3.0)), language="en", stream=True, stream_include_usage=True,
                                   stream_continuous_usage_stats=True).text)[:-1]
    final = events[-1]["usage"]
    assert len(events) > 3 and all("usage" in e for e in events) and final["prompt_tokens"] == 4
    uses = [e["usage"] for e in events]
    assert all(u["prompt_tokens"] == 4 and u["total_tokens"] == 4 + u["completion_tokens"] for u in uses)
    assert [u["completion_tokens"] for u in uses] == sorted(u["completion_tokens"] for u in uses)
    assert uses[-1] == uses[-2] == final


def test_openai_stream_events_join_to_the_text(client):
    samples = clip(9, 3.0)
    want = post_audio(client, wav(samples), language="en").json()["text"]
    events = sse_events(post_audio(client, wav(samples), language="en", stream=True, stream_format="openai").text)
    deltas = [e for e in events[:-1] if e["type"] == "transcript.text.delta"]
    done = [e for e in events[:-1] if e["type"] == "transcript.text.done"]
    assert "".join(e["delta"] for e in deltas) == want and len(done) == 1 and done[0]["text"] == want
    assert done[0]["usage"]["type"] == "tokens" and done[0]["usage"]["output_tokens"] > 0


def test_translation_stream_uses_translation_chunks(client):
    events = sse_events(post_audio(client, wav(clip(10, 2.0)), route="translations", language="de", stream=True).text)
    assert {e["object"] for e in events[:-1]} == {"translation.chunk"}


# --------------------------------------------------------------------------- sampling, long audio, translation


def test_seeded_sampling_is_reproducible(client):
    data = wav(clip(11, 3.0))
    first = post_audio(client, data, temperature=0.9, seed=7).json()["text"]
    assert post_audio(client, data, temperature=0.9, seed=7).json()["text"] == first
    assert any(post_audio(client, data, temperature=0.9, seed=s).json()["text"] != first for s in (8, 9, 10))


def test_a_detected_language_costs_no_completion_tokens(client):
    """Detecting the language forces it and the task as the decoder's first outputs: they count with the
    prompt, so max_completion_tokens and usage are the same as when the language is told."""
    data = wav(clip(19, 3.0))
    detected = post_audio(client, data, response_format="verbose_json").json()["language"]

    def run(**fields):
        events = sse_events(post_audio(client, data, stream=True, stream_include_usage=True,
                                       max_completion_tokens=5, **fields).text)
        text = "".join(c["choices"][0]["delta"]["content"] for c in events[:-1] if c["choices"])
        return text, events[-2]["usage"]

    assert run() == run(language=detected)
    assert run()[1]["completion_tokens"] == 5


def test_long_audio_is_transcribed_window_after_window(client):
    samples = clip(12, 65.0)
    r = post_audio(client, wav(samples), language="en", response_format="verbose_json")
    body = r.json()
    assert body["duration"] == 65.0
    _check_segments(body["segments"], 65.0)
    assert len({s["seek"] for s in body["segments"]}) == 3, "three windows"
    streamed = sse_events(post_audio(client, wav(samples), language="en", stream=True).text)
    text = "".join(c["choices"][0]["delta"]["content"] for c in streamed[:-1] if c["choices"])
    assert text == post_audio(client, wav(samples), language="en").json()["text"]


def test_translation_and_its_language(client, tiny_whisper):
    samples = as_pcm16(clip(13, 3.0))
    want = oracle(tiny_whisper).text(samples, task="translate", language="fr")
    r = post_audio(client, wav(samples), route="translations", language="fr")
    assert r.status_code == 200 and r.json() == {"text": want}


def test_metrics_count_each_window_as_a_request_with_its_tokens(tiny_whisper):
    """/metrics under vLLM's names: a transcription is one finished request per 30 s window (vLLM runs each
    chunk as its own request), with the decoder's prompt and generated tokens."""
    from serverkit import parse_metrics

    with api_client(tiny_whisper, max_model_len=None, plugins=(*PLUGINS, "health")) as c:
        def counts() -> tuple[float, float, float]:
            m = parse_metrics(c.get("/metrics").text)
            finished = sum(m[f"request_success_total{{finished_reason={r}}}"] for r in ("stop", "length"))
            return finished, m["prompt_tokens_total"], m["generation_tokens_total"]

        for seconds, windows in ((3.0, 1), (45.0, 2)):
            before = counts()
            r = post_audio(c, wav(clip(17, seconds)), language="en", stream=True, stream_include_usage=True)
            usage = sse_events(r.text)[-2]["usage"]
            after = counts()
            assert [b - a for a, b in zip(before, after)] == [windows, usage["prompt_tokens"],
                                                             usage["completion_tokens"]]


# --------------------------------------------------------------------------- errors


def test_bad_requests_are_named_4xx(client, tiny_whisper):
    data = wav(clip(14, 1.0))
    assert_error(post_audio(client, b"this is not audio"), 400, "file", contains="not audio")
    assert_error(client.post("/v1/audio/transcriptions", files={"x": ("a", b"1")}, data={"model": "tiny"}), 400, "x")
    assert_error(client.post("/v1/audio/transcriptions", files={"model": (None, "tiny")}), 400, "file")
    assert_error(client.post("/v1/audio/transcriptions", json={"model": "tiny"}), 415, None, contains="multipart")
    assert_error(client.post("/v1/audio/transcriptions", data={"model": "tiny", "file": "x"}), 415, None,
                 contains="multipart")
    assert_error(post_audio(client, data, response_format="xml"), 400, "response_format")
    assert_error(post_audio(client, data, language="xx"), 400, "language")
    assert_error(post_audio(client, data, model="nope"), 404, "model")
    assert_error(post_audio(client, data, temperature=3), 400, "temperature")
    assert_error(post_audio(client, data, temperature="warm"), 400, "temperature")
    assert_error(post_audio(client, data, timestamp_granularities=["word"]), 400, "timestamp_granularities")
    assert_error(post_audio(client, data, response_format="srt", stream=True), 400, "stream")
    assert_error(post_audio(client, data, stream_include_usage=True), 400, "stream_include_usage")
    assert_error(post_audio(client, data, use_beam_search=True), 400, "use_beam_search")
    assert_error(post_audio(client, data, unknown_field=1), 400, "unknown_field")
    assert_error(post_audio(client, data, priority=1), 400, "priority", contains="--scheduling-policy")
    assert_error(post_audio(client, encode(np.zeros(0, np.float32), RATE, "wav")), 400, "file")
    assert client.model.stats().running == 0


def test_limits_missing_keys_and_models_that_cannot_transcribe(tiny_whisper, tiny_llama):
    data = wav(clip(15, 1.0))
    with api_client(tiny_whisper, max_model_len=None, plugins=PLUGINS, max_audio_filesize_mb=0.01,
                    api_key=("k",)) as c:
        assert_error(c.post("/v1/audio/transcriptions", files={"file": ("a.wav", data)}), 401)
        auth = {"Authorization": "Bearer k"}
        r = c.post("/v1/audio/transcriptions", files={"file": ("a.wav", data)}, headers=auth)
        assert_error(r, 413, "file", contains="MiB")
        assert_error(c.post("/v1/completions", json={"prompt": "hi"}, headers=auth), 400, "model",
                     contains="transcription")
    with api_client(tiny_llama, plugins=PLUGINS) as c:
        err = assert_error(post_audio(c, data), 400, "model", contains="generate")
        assert err["code"] == "unsupported_task"


def test_the_audio_limit_is_the_routes_body_limit_whatever_the_request_body_limit(tiny_whisper):
    """--max-audio-filesize-mb above --max-request-body-size: the audio routes take files up to it (the JSON
    routes keep the body limit); a body past the audio routes' own limit is a 413 naming the file."""
    stereo = wav(np.stack([clip(18, 8.0, 48000)] * 2, axis=1), 48000)  # 1.5 MiB
    with api_client(tiny_whisper, max_model_len=None, plugins=PLUGINS, max_audio_filesize_mb=3,
                    max_request_body_bytes=2**20) as c:
        assert post_audio(c, stereo, language="en").status_code == 200
        assert_error(c.post("/v1/completions", json={"prompt": "x" * 2**20}), 413)
    for body_limit in (2**20, 32 * 2**20):  # the body stops at Litestar's limit (0.25 + 1 MiB), or in the form
        with api_client(tiny_whisper, max_model_len=None, plugins=PLUGINS, max_audio_filesize_mb=0.25,
                        max_request_body_bytes=body_limit) as c:
            err = assert_error(post_audio(c, stereo), 413, "file", contains="at most 0.25 MiB")
            assert err["code"] == "file_too_large"


def test_priority_reaches_the_engine_on_a_priority_server(tiny_whisper, monkeypatch):
    from patchbay.engine.engine import Engine

    seen = []
    original = Engine.generate

    def spy(self, request_id, prompt_ids, params, **kw):
        seen.append(kw.get("priority"))
        return original(self, request_id, prompt_ids, params, **kw)

    monkeypatch.setattr(Engine, "generate", spy)
    with api_client(tiny_whisper, max_model_len=None, plugins=PLUGINS, scheduling_policy="priority") as c:
        assert post_audio(c, wav(clip(20, 1.0)), language="en", priority=-3).status_code == 200
    assert seen == [-3]


def test_realtime_keeps_a_bounded_queue_of_utterances(tiny_whisper):
    """Final commits past MAX_WAITING_UTTERANCES waiting are error events; the connection goes on and every
    accepted utterance is transcribed."""
    import base64
    import json

    from patchbay_plugins.endpoints.realtime import MAX_WAITING_UTTERANCES
    from speechkit import pcm16

    sent = MAX_WAITING_UTTERANCES + 8
    append = json.dumps({"type": "input_audio_buffer.append",
                         "audio": base64.b64encode(pcm16(clip(21, 4.0))).decode()})
    final = json.dumps({"type": "input_audio_buffer.commit", "final": True})
    with api_client(tiny_whisper, max_model_len=None, plugins=(*PLUGINS, "realtime")) as c:
        with c.websocket_connect("/v1/realtime") as ws:
            assert ws.receive_json()["type"] == "session.created"
            for _ in range(sent):
                ws.send_text(append)
                ws.send_text(final)
            done, errors = 0, []
            while done + len(errors) < sent:
                event = ws.receive_json()
                if event["type"] == "transcription.done":
                    done += 1
                elif event["type"] == "error":
                    errors.append(event)
        assert errors and {(e["code"], e["param"]) for e in errors} == {("too_many_utterances", "final")}
        assert done >= MAX_WAITING_UTTERANCES
        assert c.model.stats().running == 0


def test_a_model_that_cannot_translate_says_so(tiny_whisper_factory):
    with api_client(tiny_whisper_factory(multilingual=False), max_model_len=None, plugins=PLUGINS) as c:
        data = wav(clip(16, 1.0))
        assert_error(post_audio(c, data, route="translations"), 400, "model", contains="cannot translate")
        assert_error(post_audio(c, data, language="de"), 400, "language")
        assert post_audio(c, data, language="en").status_code == 200


def test_openapi_describes_the_routes_as_forms_with_a_required_file(tiny_whisper):
    from patchbay_plugins.endpoints.audio import create_transcription, create_translation
    from patchbay_plugins.endpoints.speechform import SpeechForm

    assert create_transcription.opt["body"] is SpeechForm
    assert create_translation.opt["body"].__mro__[1] is SpeechForm
    with api_client(tiny_whisper, max_model_len=None, plugins=(*PLUGINS, "docs")) as c:
        paths = c.get("/openapi.json").json()["paths"]
    for route in ("transcriptions", "translations"):
        content = paths[f"/v1/audio/{route}"]["post"]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data"}  # a url-encoded form cannot carry the file
        schema = content["multipart/form-data"]["schema"]
        props = schema["properties"]
        assert schema["required"] == ["file"] and props["file"] == {"type": "string", "format": "binary"}
        assert props["temperature"] == {"type": "number", "default": 0.0}
        assert props["seed"] == {"type": "integer"} and props["language"] == {"type": "string"}  # no null in a form
        assert props["timestamp_granularities"]["type"] == "array"
        assert props["vllm_xargs"]["contentMediaType"] == "application/json"
        assert "null" not in str(schema)
