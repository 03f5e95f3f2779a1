"""Rotary position embedding (the "neox" / rotate-half layout transformers' llama uses).

A model builds the ``(cos, sin)`` tables once at load (:func:`cos_sin_cache`),
selects the rows of this step's positions once per forward
(``cos[positions]``, ``sin[positions]``), and every layer then calls
:func:`apply_rotary` with those rows.
"""

from __future__ import annotations

import torch


def cos_sin_cache(
    inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[max_positions, rotary_dim // 2]`` float32, for positions ``0..max_positions-1``."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.to(torch.float32))
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reference_apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hkv, D]``; ``cos``/``sin`` are ``[T, D // 2]``
    (the rows of each token's position). Computed in float32, cast back."""
    c = cos.unsqueeze(1)
    s = sin.unsqueeze(1)
    q_out = _rotate(q.to(torch.float32), c, s).to(q.dtype)
    k_out = _rotate(k.to(torch.float32), c, s).to(k.dtype)
    return q_out, k_out


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference_apply_rotary` on q and k at once, in six ops: float32 math (``cos``
    is float32) rounded once. Returns views of one ``[T, Hq + Hkv, D]`` tensor."""
    hq, half = q.shape[1], q.shape[2] // 2
    x = torch.cat((q, k), dim=1)
    s = sin.unsqueeze(1)
    out = x * torch.cat((cos, cos), dim=-1).unsqueeze(1)
    out[..., :half].addcmul_(x[..., half:], s, value=-1)
    out[..., half:].addcmul_(x[..., :half], s)
    out = out.to(q.dtype)
    return out[:, :hq], out[:, hq:]
