"""SiLU-and-multiply, the gated MLP activation of llama-style models."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchbay_kernels import cpp


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x[..., :d]`` through SiLU times ``x[..., d:]``, where ``x`` is ``[..., 2d]``."""
    d = x.shape[-1] // 2
    gate, up = x[..., :d], x[..., d:]
    return gate * torch.sigmoid(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """On CPU one C++ pass over ``[N, 2d]`` rows; else SiLU then an in-place multiply."""
    d = x.shape[-1] // 2
    ops = cpp.ops_for(x)
    if ops is not None and x.dim() == 2 and x.stride(1) == 1:
        out = torch.empty(x.shape[0], d, dtype=x.dtype)
        ops.silu_and_mul(x, out)
        return out
    out = F.silu(x[..., :d])
    out.mul_(x[..., d:])
    return out
