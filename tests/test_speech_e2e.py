"""End to end: a real ``serve`` of a tiny Whisper, driven by the official ``openai`` client and a
``websockets`` client (/v1/realtime)."""

from __future__ import annotations

import asyncio
import base64
import json

import openai
import pytest

from serverkit import serve
from speechkit import as_pcm16, clip, encode, pcm16, wav

pytestmark = pytest.mark.e2e
KEY = "sk-speech"


@pytest.fixture(scope="module")
def server(tiny_whisper, tmp_path_factory):
    with serve([str(tiny_whisper), "--served-model-name", "whisper-tiny", "--api-key", KEY, "--cpu-threads", "1"],
               tmp_path_factory.mktemp("speech")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_transcriptions_through_the_openai_client(client):
    samples = as_pcm16(clip(30, 4.0))
    text = client.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", wav(samples)), language="en")
    assert isinstance(text.text, str) and text.text
    plain = client.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", wav(samples)), language="en",
                                               response_format="text")
    assert plain == text.text
    verbose = client.audio.transcriptions.create(
        model="whisper-tiny", file=("a.flac", encode(samples, 16000, "flac")), response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    assert verbose.duration == 4.0 and verbose.segments[0].start == 0 and verbose.segments[-1].end == 4.0
    assert verbose.words and all(0 <= w.start <= w.end <= 4.0 for w in verbose.words)
    srt = client.audio.transcriptions.create(model="whisper-tiny", file=("a.webm", encode(samples, 16000, "webm")),
                                             response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> ")
    vtt = client.audio.transcriptions.create(model="whisper-tiny", file=("a.m4a", encode(samples, 16000, "m4a")),
                                             response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")


def test_translations_through_the_openai_client(client):
    out = client.audio.translations.create(model="whisper-tiny", file=("a.mp3", encode(clip(31, 3.0), 16000, "mp3")))
    assert isinstance(out.text, str)


def test_streaming_through_the_openai_client(client):
    samples = as_pcm16(clip(32, 3.0))
    want = client.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", wav(samples)), language="en").text
    stream = client.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", wav(samples)), language="en",
                                                stream=True, extra_body={"stream_format": "openai"})
    deltas, done = [], None
    for event in stream:
        if event.type == "transcript.text.delta":
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done = event
    assert "".join(deltas) == want == done.text and done.usage.output_tokens > 0
    # the default style (the reference's transcription.chunk), read as vLLM's own client example reads it
    chunks = list(client.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", wav(samples)),
                                                     language="en", stream=True,
                                                     extra_body={"stream_include_usage": True}))
    assert "".join(c.choices[0]["delta"]["content"] for c in chunks if c.choices) == want
    assert chunks[-1].usage["completion_tokens"] == done.usage.output_tokens


def test_errors_through_the_openai_client(client, server):
    data = wav(clip(33, 1.0))
    with pytest.raises(openai.NotFoundError) as e:
        client.audio.transcriptions.create(model="nope", file=("a.wav", data))
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-tiny", file=("a.txt", b"hello"))
    assert e.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", data), language="klingon")
    assert e.value.body["param"] == "language"
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", data))


# --------------------------------------------------------------------------- /v1/realtime


def _ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime"


async def _utterance(ws, pcm: bytes, chunk: int) -> tuple[str, dict]:
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    for i in range(0, len(pcm), chunk):
        await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                  "audio": base64.b64encode(pcm[i:i + chunk]).decode()}))
    await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
    text = ""
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if event["type"] == "transcription.delta":
            text += event["delta"]
        elif event["type"] == "transcription.done":
            return text, event
        else:
            raise AssertionError(event)


def test_realtime_utterances_equal_the_offline_text(server, client):
    import websockets

    clips = [as_pcm16(clip(40 + i, 2.0 + i)) for i in range(2)]
    offline = [client.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", wav(c)), temperature=0).text
               for c in clips]

    async def go():
        async with websockets.connect(_ws_url(server), additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            created = json.loads(await ws.recv())
            assert created["type"] == "session.created" and created["id"].startswith("sess-")
            await ws.send(json.dumps({"type": "session.update", "model": "nope"}))
            err = json.loads(await ws.recv())
            assert err["type"] == "error" and err["code"] == "model_not_found"
            await ws.send(json.dumps({"type": "session.update", "model": "whisper-tiny"}))
            assert json.loads(await ws.recv())["type"] == "session.updated"
            for bad in ("{nope", json.dumps({"type": "input_audio_buffer.append", "audio": "!!"}),
                        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
                        json.dumps({"type": "what"}), json.dumps([1])):
                await ws.send(bad)
                assert json.loads(await ws.recv())["type"] == "error"
            got = []
            for c, chunk in zip(clips, (3200, 5678)):
                text, done = await _utterance(ws, pcm16(c), chunk)
                assert text == done["text"] and done["usage"]["completion_tokens"] > 0
                got.append(text)
            return got

    assert asyncio.run(go()) == offline


def test_realtime_refuses_a_handshake_without_the_key(server):
    import websockets

    async def go():
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            async with websockets.connect(_ws_url(server)):
                pass
        assert e.value.response.status_code == 403

    asyncio.run(go())


def test_a_vanishing_realtime_client_frees_what_it_held(server):
    import time

    import websockets

    def held() -> tuple[float, float]:
        m = server.metrics(KEY)
        return m.get("num_requests_running", 0) + m.get("num_requests_waiting", 0), m.get("kv_cache_usage_perc", 0)

    async def go():
        ws = await websockets.connect(_ws_url(server), additional_headers={"Authorization": f"Bearer {KEY}"})
        await ws.recv()
        audio = base64.b64encode(pcm16(clip(50, 28.0))).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        deadline = time.monotonic() + 60
        while held()[0] == 0:  # the utterance is on the engine
            assert time.monotonic() < deadline, "the utterance never ran"
            await asyncio.sleep(0.05)
        ws.transport.abort()  # gone without a closing handshake

    asyncio.run(go())
    deadline = time.monotonic() + 30
    while held() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert held() == (0, 0)


def test_realtime_connections_are_independent(server, client):
    import websockets

    clips = [as_pcm16(clip(60 + i, 2.5)) for i in range(3)]
    offline = [client.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", wav(c))).text for c in clips]
    assert len(set(offline)) > 1, "pick clips that read differently"

    async def one(c):
        async with websockets.connect(_ws_url(server), additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            await ws.recv()
            return (await _utterance(ws, pcm16(c), 4000))[0]

    async def go():
        return await asyncio.gather(*(one(c) for c in clips))

    assert asyncio.run(go()) == offline


def test_a_config_file_serves_whisper_beside_a_text_model(tiny_whisper, tiny_llama, client, tmp_path):
    """``serve --config`` with a Whisper and a text model: each answers its own routes under its name, each
    refuses the other's with a 400 naming what it can do, realtime sessions pick the speech model."""
    import re
    import textwrap

    import httpx
    import websockets

    (tmp_path / "serve.yaml").write_text(textwrap.dedent(f"""
        api-key: {KEY}
        cpu-threads: 1
        max-num-seqs: 4
        models:
          - model: {tiny_llama}
            served-model-name: writer
            max-model-len: 128
          - model: {tiny_whisper}
            served-model-name: whisper
    """))
    samples = as_pcm16(clip(70, 3.0))
    want = client.audio.transcriptions.create(model="whisper-tiny", file=("a.wav", wav(samples)), language="en").text
    with serve(["--config", str(tmp_path / "serve.yaml")], tmp_path) as multi:
        c = openai.OpenAI(base_url=multi.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["writer", "whisper"]
        got = c.audio.transcriptions.create(model="whisper", file=("a.wav", wav(samples)), language="en")
        assert got.text == want
        assert c.completions.create(model="writer", prompt="hi", max_tokens=3).usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError) as e:
            c.audio.transcriptions.create(model="writer", file=("a.wav", wav(samples)))
        assert e.value.body["param"] == "model" and "generate" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="whisper", prompt="hi", max_tokens=3)
        assert "transcription" in e.value.body["message"]

        async def realtime():
            async with websockets.connect(multi.url.replace("http://", "ws://") + "/v1/realtime",
                                          additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "session.update", "model": "writer"}))
                err = json.loads(await ws.recv())
                assert err["type"] == "error" and err["param"] == "model", err
                await ws.send(json.dumps({"type": "session.update", "model": "whisper", "language": "en"}))
                assert json.loads(await ws.recv())["type"] == "session.updated"
                return (await _utterance(ws, pcm16(samples), 4096))[0]

        assert asyncio.run(realtime()) == want
        text = httpx.get(multi.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        tokens = dict(re.findall(r'^vllm:generation_tokens_total\{model_name="(\w+)"\} ([\d.]+)', text, re.M))
        assert set(tokens) == {"writer", "whisper"} and all(float(v) > 0 for v in tokens.values()), tokens
