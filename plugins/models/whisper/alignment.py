"""Token timestamps from cross-attention: Whisper's alignment heads, a median filter and dynamic time warping.

The same method as transformers' ``WhisperForConditionalGeneration._extract_token_timestamps``
(and OpenAI's ``find_alignment``): the cross-attention probabilities of the
checkpoint's ``alignment_heads``, recorded while the output was generated (one
row per decoder query after the prompt), cropped to the audio's frames,
standardised over the tokens, median-filtered along time, averaged over the
heads; DTW through the negated matrix then gives each token the encoder frame
at which it starts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: seconds per encoder position (two mel frames of 10 ms)
SECONDS_PER_POSITION = 0.02


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window of odd ``width`` along the last dimension (edges reflected)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    shape = x.shape
    padded = F.pad(x.reshape(-1, 1, shape[-1]), (pad, pad), mode="reflect").reshape(*shape[:-1], -1)
    return padded.unfold(-1, width, 1).sort()[0][..., pad]


def dtw(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotone path through ``matrix`` ``[tokens, frames]``: ``(token indices, frame indices)``.

    Costs are filled one anti-diagonal at a time (each cell needs only the two diagonals before it);
    ties are broken as transformers breaks them (diagonal only when strictly cheapest, then up, else left).
    """
    n, m = matrix.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1.0, dtype=np.float32)
    cost[0, 0] = 0
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        diag = (c0 < c1) & (c0 < c2)
        up = ~diag & (c1 < c0) & (c1 < c2)
        best = np.where(diag, c0, np.where(up, c1, c2))
        cost[i, j] = matrix[i - 1, j - 1] + best
        trace[i, j] = np.where(diag, 0, np.where(up, 1, 2))
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = n, m
    rows, cols = [], []
    while i > 0 or j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


def token_times(weights: torch.Tensor, num_frames: int, filter_width: int) -> list[float]:
    """Start times (seconds) of the generated tokens from alignment-head weights ``[heads, rows, positions]``,
    one row per generated token fed back to the decoder (so one fewer than the tokens); the last token gets
    the last time. ``num_frames``: mel frames that hold audio (the rest of the window is padding)."""
    rows = weights.shape[1]
    if rows == 0:
        return [0.0]
    w = weights[..., : max(num_frames // 2, 1)].float()
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = (w - mean) / std.clamp_min(1e-10)
    w = median_filter(w, filter_width).mean(dim=0)
    token_idx, frame_idx = dtw(-w.double().numpy())
    jumps = np.pad(np.diff(token_idx), (1, 0), constant_values=1).astype(bool)
    times = (frame_idx[jumps] * SECONDS_PER_POSITION).tolist()
    return times + times[-1:]
