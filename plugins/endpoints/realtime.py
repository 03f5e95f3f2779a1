"""/v1/realtime — streaming transcription over a websocket, vLLM's realtime protocol.

The client connects (with ``Authorization: Bearer KEY`` when the server has
keys; without one the handshake is refused) and gets ``session.created``. It
may send ``session.update`` (``model``; also ``language`` and ``prompt``,
patchbay's extras) — answered by ``session.updated`` or, for an unknown model
or one that cannot transcribe, an ``error`` event. It then streams an
utterance as ``input_audio_buffer.append`` events (``audio``: base64 PCM16,
16 kHz mono, any even number of bytes) between ``input_audio_buffer.commit``
events; the commit with ``final: true`` ends the utterance, which is
transcribed as one clip (greedy, so its text is the offline endpoint's at
temperature 0, however it was chunked): ``transcription.delta`` events as text
is generated, then ``transcription.done`` with ``text`` and ``usage``.
Utterances are transcribed one after another, in order, while the next one is
being sent; at most ``MAX_WAITING_UTTERANCES`` may wait (a final commit past
that is an ``error`` event and keeps its audio in the buffer). A malformed event gets an ``error`` event
(``{"type": "error", "error", "code", "param"}``) and the connection stays
usable. When the client goes away, its running transcription is aborted and
its buffers dropped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
import uuid
from typing import Any

import msgspec
from litestar import WebSocket, websocket

from patchbay import hookimpl
from patchbay.engine.params import SamplingParams
from patchbay.errors import APIError
from patchbay.protocol import decode_json
from patchbay.serving import Serving, ServingDep
from patchbay.speech import SpeechJob, Transcript

log = logging.getLogger("patchbay.realtime")

#: the realtime protocol's audio: PCM16 mono at this rate
PCM_RATE = 16000
#: committed utterances a connection may have waiting behind the one being transcribed (each up to
#: --max-audio-filesize-mb of audio)
MAX_WAITING_UTTERANCES = 8
_CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit")


class EventError(Exception):
    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


class Session:
    """One connection: its settings, the audio of the utterance being sent, and the utterances waiting."""

    def __init__(self, socket: WebSocket, serving: Serving):
        self.socket, self.serving = socket, serving
        self.id = f"sess-{uuid.uuid4().hex}"
        self.model_name: str | None = None
        self.language: str | None = None
        self.prompt = ""
        self.buffer = bytearray()
        self.utterances: asyncio.Queue[bytes] = asyncio.Queue()
        self.count = 0
        self._send_lock = asyncio.Lock()
        self.max_bytes = int(serving.config.max_audio_filesize_mb * 2**20)

    async def send(self, event: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.socket.send_data(msgspec.json.encode(event).decode(), mode="text")

    async def error(self, message: str, code: str, param: str | None = None) -> None:
        await self.send({"type": "error", "error": message, "code": code, "param": param})

    # ------------------------------------------------------------------ client events

    async def handle(self, text: str) -> None:
        try:  # as strict as a request body: no NaN, numbers in range, nesting bounded
            event = decode_json(text.encode())
        except APIError as exc:
            raise EventError(exc.message.replace("request body", "event"), exc.code or "invalid_json",
                             exc.param) from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise EventError("An event is a JSON object with a string 'type'.", "invalid_event", "type")
        kind = event["type"]
        if kind not in _CLIENT_EVENTS:
            raise EventError(f"Unknown event type {kind!r}; known: {', '.join(_CLIENT_EVENTS)}.", "unknown_event",
                             "type")
        if kind == "session.update":
            await self._update(event)
        elif kind == "input_audio_buffer.append":
            self._append(event)
        else:
            final = event.get("final", False)
            if not isinstance(final, bool):
                raise EventError("'final' must be true or false.", "invalid_event", "final")
            if final:
                if not self.buffer:
                    raise EventError("Nothing to transcribe: the audio buffer is empty.", "empty_audio", "audio")
                if self.utterances.qsize() >= MAX_WAITING_UTTERANCES:
                    raise EventError(f"{MAX_WAITING_UTTERANCES} utterances are already waiting to be transcribed; "
                                     "commit this one again once one is done (the audio is kept).",
                                     "too_many_utterances", "final")
                self.utterances.put_nowait(bytes(self.buffer))
                self.buffer.clear()

    async def _update(self, event: dict[str, Any]) -> None:
        unknown = sorted(set(event) - {"type", "model", "language", "prompt", "event_id"})
        if unknown:
            raise EventError(f"Unrecognized session.update field(s): {', '.join(unknown)}.", "invalid_event",
                             unknown[0])
        name = event.get("model", self.model_name)
        try:
            model, name = self.serving.resolve(name)
            model.require_task("transcription")
        except APIError as exc:
            raise EventError(exc.message, exc.code or "invalid_model", "model") from None
        language = event.get("language", self.language)
        if language is not None and (not isinstance(language, str) or language.lower() not in model.speech_facts.languages):
            raise EventError(f"Unsupported language {language!r}.", "invalid_language", "language")
        prompt = event.get("prompt", self.prompt)
        if not isinstance(prompt, str):
            raise EventError("'prompt' must be a string.", "invalid_event", "prompt")
        self.model_name, self.language, self.prompt = name, language and language.lower(), prompt
        await self.send({"type": "session.updated", "model": name, "language": self.language})

    def _append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise EventError("'audio' must be a base64 string of PCM16 samples.", "invalid_audio", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("'audio' is not valid base64.", "invalid_audio", "audio") from None
        if len(data) % 2:
            raise EventError(f"PCM16 audio has two bytes per sample; this chunk has {len(data)} bytes.",
                             "invalid_audio", "audio")
        if len(self.buffer) + len(data) > self.max_bytes:
            raise EventError(f"The utterance would exceed {self.max_bytes / 2**20:g} MiB of audio; commit it "
                             "with final: true first.", "audio_too_large", "audio")
        self.buffer += data

    # ------------------------------------------------------------------ transcription

    async def worker(self) -> None:
        """Transcribe committed utterances, in order, for as long as the connection lives."""
        while True:
            pcm = await self.utterances.get()
            try:
                await self._transcribe(pcm)
            except APIError as exc:
                await self.error(exc.message, exc.code or "transcription_failed", exc.param)

    async def _transcribe(self, pcm: bytes) -> None:
        model, _ = self.serving.resolve(self.model_name)
        model.require_task("transcription")
        self.count += 1
        audio = model.pcm16_audio(pcm, PCM_RATE)
        job = SpeechJob(task="transcribe", language=self.language, prompt=self.prompt,
                        params=SamplingParams(max_tokens=1 << 30, temperature=0.0))
        async for event in model.transcribe(f"rt-{self.id}-{self.count}", audio, job):
            if isinstance(event, Transcript):
                await self.send({"type": "transcription.done", "text": event.text, "usage": {
                    "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                    "total_tokens": event.prompt_tokens + event.completion_tokens,
                    "audio_seconds": round(event.duration, 3)}})
            elif event.text:
                await self.send({"type": "transcription.delta", "delta": event.text})


@websocket("/v1/realtime")
async def realtime(socket: WebSocket, serving: ServingDep) -> None:
    await socket.accept()
    session = Session(socket, serving)
    await session.send({"type": "session.created", "id": session.id, "created": int(time.time())})
    worker = asyncio.ensure_future(session.worker())
    try:
        while True:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await session.error("Events are JSON text frames, not binary ones.", "invalid_event")
                continue
            try:
                await session.handle(text)
            except EventError as exc:
                await session.error(exc.message, exc.code, exc.param)
    except Exception as exc:  # noqa: BLE001 - the client vanished mid-send, or the socket broke
        log.debug("realtime session %s ended: %s", session.id, exc)
        with contextlib.suppress(Exception):  # if the socket still stands, the client learns it is over
            await socket.close(code=1011)
    finally:
        worker.cancel()  # aborts the utterance on the engine (its sequence and blocks are freed)
        try:
            await worker
        except BaseException:  # noqa: BLE001
            pass
        session.buffer.clear()


@hookimpl
def register_routes(register):
    register(realtime)
