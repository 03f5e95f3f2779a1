"""Helpers for the speech tests: deterministic clips, audio files in every container the API takes (written
with soundfile and PyAV, nothing installed by hand), and transformers' Whisper as the oracle."""

from __future__ import annotations

import copy
import functools
import io
from pathlib import Path
from typing import Any

import numpy as np

RATE = 16000
#: container -> file name the upload gets
FORMATS = {"wav": "a.wav", "flac": "a.flac", "ogg": "a.ogg", "mp3": "a.mp3", "m4a": "a.m4a", "webm": "a.webm"}


def clip(seed: int, seconds: float, rate: int = RATE) -> np.ndarray:
    """Mono float32 audio: a few tones gliding in pitch plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    out = 0.03 * rng.standard_normal(t.shape[0])
    for _ in range(3):
        f0, f1 = rng.uniform(120, 3000, 2)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-3)))
        out += rng.uniform(0.05, 0.3) * np.sin(phase) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 3) * t))
    return out.astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """``samples`` (``[n]`` or ``[n, channels]``) as a file of container ``fmt``."""
    import soundfile as sf

    buf = io.BytesIO()
    if fmt in ("wav", "flac"):
        sf.write(buf, samples, rate, format=fmt.upper(), subtype="PCM_16")
    elif fmt == "ogg":
        sf.write(buf, samples, rate, format="OGG", subtype="VORBIS")
    elif fmt == "mp3":
        sf.write(buf, samples, rate, format="MP3", subtype="MPEG_LAYER_III")
    else:
        return _encode_av(samples, rate, fmt)
    return buf.getvalue()


def _encode_av(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    import av

    container_format, codec = {"m4a": ("ipod", "aac"), "webm": ("webm", "libopus")}[fmt]
    out_rate = 48000 if codec == "libopus" else rate
    data = samples if samples.ndim == 2 else samples[:, None]
    layout = "mono" if data.shape[1] == 1 else "stereo"
    if out_rate != rate:
        import soxr

        data = soxr.resample(data, rate, out_rate).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=out_rate, layout=layout)
        frame_size = 960 if codec == "libopus" else 1024
        for start in range(0, data.shape[0], frame_size):
            chunk = np.ascontiguousarray(data[start:start + frame_size].T, dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = out_rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def wav(samples: np.ndarray, rate: int = RATE) -> bytes:
    return encode(samples, rate, "wav")


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def as_pcm16(samples: np.ndarray) -> np.ndarray:
    """``samples`` as they come back from 16-bit files (so a WAV upload and raw PCM16 carry the same audio)."""
    return np.frombuffer(pcm16(samples), dtype="<i2").astype(np.float32) / 32768.0


# --------------------------------------------------------------------------- the oracle


class Oracle:
    """transformers' ``WhisperForConditionalGeneration`` and ``WhisperProcessor`` on a folder."""

    def __init__(self, model_dir: Path):
        import transformers
        from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

        transformers.logging.set_verbosity_error()
        self.model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
        self.processor = WhisperProcessor.from_pretrained(model_dir)
        self.generation_config = GenerationConfig.from_pretrained(model_dir)

    def features(self, samples: np.ndarray):
        return self.processor(samples, sampling_rate=RATE, return_tensors="pt").input_features

    def generate(self, samples: np.ndarray, **kwargs: Any):
        """``generate``'s output (sequences with the prompt) for one clip under 30 s.

        ``force_unique_generate_call``: one decoding of the window, never a second seek into the audio
        (random weights say timestamp tokens even without timestamps, which would send transformers' loop
        seeking on); the config is copied per call since ``generate`` edits it."""
        import torch

        if kwargs.get("return_token_timestamps"):  # its audio frames, from the mask, crop the attention to the audio
            kwargs["attention_mask"] = self.processor(samples, sampling_rate=RATE, return_tensors="pt",
                                                      return_attention_mask=True).attention_mask
        with torch.no_grad():
            return self.model.generate(self.features(samples), generation_config=copy.deepcopy(self.generation_config),
                                       return_dict_in_generate=True, force_unique_generate_call=True, **kwargs)

    def text(self, samples: np.ndarray, **kwargs: Any) -> str:
        out = self.generate(samples, **kwargs)
        return self.processor.batch_decode(out.sequences, skip_special_tokens=True)[0]


@functools.lru_cache(maxsize=4)
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


def post_audio(client: Any, data: bytes, route: str = "transcriptions", name: str = "a.wav", **fields: Any):
    """POST a multipart form as the openai client sends it (lists as ``key[]``)."""
    def text(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    form = {f"{k}[]" if isinstance(v, list) else k: [text(x) for x in v] if isinstance(v, list) else text(v)
            for k, v in fields.items()}
    return client.post(f"/v1/audio/{route}", files={"file": (name, data, "application/octet-stream")},
                       data=form)
