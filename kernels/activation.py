"""SiLU-and-multiply, the gated MLP activation of llama-style models."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x[..., :d]`` through SiLU times ``x[..., d:]``, where ``x`` is ``[..., 2d]``."""
    d = x.shape[-1] // 2
    gate, up = x[..., :d], x[..., d:]
    return gate * torch.sigmoid(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    out = F.silu(x[..., :d])
    out.mul_(x[..., d:])
    return out
