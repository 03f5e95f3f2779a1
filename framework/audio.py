"""Audio in: uploaded files and raw PCM16 to mono float32 waveforms at a model's sampling rate.

Files are decoded with libsndfile (``soundfile``: WAV, FLAC, OGG Vorbis/Opus,
MP3, ...) and, for what it cannot read, FFmpeg's libraries (PyAV: M4A/AAC,
WebM/Opus, MP4, ...), as librosa reads files. Several channels are down-mixed
by their mean (as librosa and vLLM do); the result is resampled with soxr
(``HQ``, librosa's default) to the rate the model's processor takes.
Anything that does not decode to at least one sample is an :class:`AudioError`
(a 400 for the client).
"""

from __future__ import annotations

import io

import attrs
import numpy as np


class AudioError(ValueError):
    """The bytes are not audio this server can decode (a client error)."""


@attrs.frozen
class Waveform:
    """Mono float32 samples at ``sampling_rate``."""

    samples: np.ndarray
    sampling_rate: int

    @property
    def duration(self) -> float:
        return self.samples.shape[0] / self.sampling_rate


def decode_audio(data: bytes, sampling_rate: int, max_seconds: float | None = None) -> Waveform:
    """The audio file ``data`` (any container and codec we can read), mono, at ``sampling_rate``.

    ``max_seconds``: refuse audio longer than this (decoding stops there)."""
    if not data:
        raise AudioError("The audio file is empty.")
    samples, rate = _read(data, max_seconds)
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return Waveform(resample(mono, rate, sampling_rate), sampling_rate)


def pcm16(data: bytes, rate: int, sampling_rate: int) -> Waveform:
    """Raw little-endian signed 16-bit mono samples at ``rate``, as a waveform at ``sampling_rate``."""
    if len(data) % 2:
        raise AudioError(f"PCM16 audio has two bytes per sample; got {len(data)} bytes.")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return Waveform(resample(samples, rate, sampling_rate), sampling_rate)


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate == target or samples.size == 0:
        return samples
    import soxr

    return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32, copy=False)


def _read(data: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """``([frames, channels] float32, rate)``: libsndfile first, FFmpeg (PyAV) for what it cannot read."""
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            if max_seconds is not None and f.frames > max_seconds * f.samplerate:
                raise AudioError(f"The audio is longer than {max_seconds:g} seconds.")
            samples = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except AudioError:
        raise
    except Exception:  # noqa: BLE001 - not a format libsndfile reads (or a broken file): try FFmpeg
        samples, rate = _read_av(data, max_seconds)
    if samples.shape[0] == 0:
        raise AudioError("The audio file holds no samples.")
    if not np.isfinite(samples).all():
        raise AudioError("The audio holds samples that are not finite numbers.")
    return samples, rate


def _read_av(data: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError("The file holds no audio stream.")
            chunks: list[np.ndarray] = []
            rate, total, resampler = 0, 0, None
            for frame in container.decode(stream):
                if resampler is None:
                    rate = frame.sample_rate
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    total += out.samples
                if max_seconds is not None and total > max_seconds * rate:
                    raise AudioError(f"The audio is longer than {max_seconds:g} seconds.")
            if resampler is not None:
                chunks += [out.to_ndarray() for out in resampler.resample(None)]
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever FFmpeg says, the client sent something we cannot read
        raise AudioError(f"The file is not audio in a format this server can decode ({_reason(exc)}).") from None
    if not chunks:
        raise AudioError("The audio file holds no samples.")
    return np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), rate


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def split_windows(samples: np.ndarray, sampling_rate: int, window_seconds: float,
                  search_seconds: float = 1.0) -> list[tuple[int, int]]:
    """``[(start, end)]`` sample ranges of at most ``window_seconds`` each that cover ``samples``.

    A window ends at the quietest 100 ms (lowest energy) of its last ``search_seconds``, so that
    cuts fall between words where they can (vLLM's splitting rule); the last window takes the rest.
    """
    n = samples.shape[0]
    size = int(window_seconds * sampling_rate)
    if n <= size:
        return [(0, n)]
    search, step = int(search_seconds * sampling_rate), max(int(0.1 * sampling_rate), 1)
    out, start = [], 0
    while n - start > size:
        lo, hi = start + size - search, start + size
        region = samples[lo:hi]
        usable = len(region) // step * step
        if usable >= step:
            energy = np.square(region[:usable].reshape(-1, step), dtype=np.float64).mean(axis=1)
            cut = lo + int(np.argmin(energy)) * step + step // 2
        else:
            cut = hi
        cut = max(start + 1, min(cut, hi))
        out.append((start, cut))
        start = cut
    out.append((start, n))
    return out


__all__ = ["AudioError", "Waveform", "decode_audio", "pcm16", "resample", "split_windows"]
