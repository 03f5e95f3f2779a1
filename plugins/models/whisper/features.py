"""Whisper's log-mel features in torch, as transformers' ``WhisperFeatureExtractor`` computes them.

A window of audio is padded (or cut) to ``chunk_length`` seconds, framed by a
centred STFT (Hann window of ``n_fft``, hop ``hop_length``), its power spectrum
mapped by Slaney-style mel filters (transformers' ``mel_filter_bank``, 0–8 kHz),
log10'd, clamped to 8 below its maximum and scaled to ``(x + 4) / 4``.
``preprocessor_config.json`` gives the sizes. ``dither`` is not applied (it
would make the features random); ``do_normalize`` is.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class LogMel:
    """``__call__(waveform)``: the ``[feature_size, nb_max_frames]`` float32 features of one window."""

    def __init__(self, pre: dict[str, Any]):
        from transformers.audio_utils import mel_filter_bank

        self.feature_size = int(pre.get("feature_size", 80))
        self.sampling_rate = int(pre.get("sampling_rate", 16000))
        self.hop_length = int(pre.get("hop_length", 160))
        self.chunk_length = int(pre.get("chunk_length", 30))
        self.n_fft = int(pre.get("n_fft", 400))
        self.padding_value = float(pre.get("padding_value", 0.0))
        self.do_normalize = bool(pre.get("do_normalize", False))
        self.n_samples = self.chunk_length * self.sampling_rate
        self.nb_max_frames = self.n_samples // self.hop_length
        filters = mel_filter_bank(num_frequency_bins=1 + self.n_fft // 2, num_mel_filters=self.feature_size,
                                  min_frequency=0.0, max_frequency=8000.0, sampling_rate=self.sampling_rate,
                                  norm="slaney", mel_scale="slaney")
        self.mel_filters = torch.from_numpy(filters).to(torch.float32)  # [freq bins, mels]
        self.window = torch.hann_window(self.n_fft)

    def num_frames(self, num_samples: int) -> int:
        """Mel frames that hold audio (the rest of the window is padding)."""
        return min(math.ceil(num_samples / self.hop_length), self.nb_max_frames)

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        n = min(int(waveform.shape[0]), self.n_samples)
        x = torch.full((self.n_samples,), self.padding_value, dtype=torch.float32)
        x[:n] = waveform[:n].to(torch.float32)
        if self.do_normalize and n:
            part = x[:n].double()
            x[:n] = ((part - part.mean()) / torch.sqrt(part.var(unbiased=False) + 1e-7)).float()
        stft = torch.stft(x, self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self.mel_filters.T @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0
