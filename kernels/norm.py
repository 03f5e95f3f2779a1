"""RMSNorm, plain and fused with the residual add."""

from __future__ import annotations

import torch


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as transformers' LlamaRMSNorm does."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's fused kernel (float32 math inside); below float32 the weight is applied
    after rounding to ``x.dtype``, as the reference and transformers do."""
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
    """Overwrites ``x`` with the sum (the one returned) instead of allocating it."""
    summed = x.add_(residual)
    return rms_norm(summed, weight, eps), summed
