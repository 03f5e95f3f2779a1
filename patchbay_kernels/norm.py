"""RMSNorm, plain and fused with the residual add."""

from __future__ import annotations

import torch

from patchbay_kernels import cpp


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as transformers' LlamaRMSNorm does."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """On CPU the C++ kernel (one pass per row, float32 inside); else torch's fused kernel.
    Below float32 the weight is applied after rounding to ``x.dtype``, as the reference and
    transformers do. ``x`` is ``[N, D]`` or ``[N, H, D]``; the result is a new tensor."""
    ops = cpp.ops_for(x, weight)
    if ops is not None and x.dim() in (2, 3) and x.stride(-1) == 1 and weight.is_contiguous():
        out = torch.empty(x.shape, dtype=x.dtype)
        ops.rms_norm(x, weight, eps, out)
        return out
    if x.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * torch.rms_norm(x, (x.shape[-1],), None, eps)


def reference_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` normalised; returns ``(normed, residual + x)``."""
    summed = x + residual
    return reference_rms_norm(summed, weight, eps), summed


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference_add_rms_norm` in place: both ``x`` and ``residual`` may be overwritten
    (the C++ kernel on CPU returns them as ``(normed, sum)``; the torch path keeps the sum in ``x``)."""
    ops = cpp.ops_for(x, residual, weight)
    if (ops is not None and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous()
            and weight.is_contiguous()):
        ops.add_rms_norm(x, residual, weight, eps)
        return x, residual
    summed = x.add_(residual)
    return rms_norm(summed, weight, eps), summed
