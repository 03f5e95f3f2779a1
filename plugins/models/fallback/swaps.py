"""Faster layers swapped into a transformers model where they are recognised — and shown equal.

transformers' layers run a chain of small torch ops each (an RMSNorm is six) and
its linears hand a plain weight to the BLAS on every call. Where a module is one
of a few common shapes, it is replaced by one calling :mod:`patchbay_kernels`
(prepacked linears, the fused RMSNorm, SiLU-and-mul with gate and up projections
fused into one matrix):

- ``nn.Linear`` and GPT-2's ``Conv1D`` -> :class:`FastLinear`;
- a module with a 1-D ``weight`` and ``variance_epsilon`` / ``eps`` that computes
  Llama's RMSNorm -> :class:`FastRMSNorm`;
- a module with ``gate_proj``, ``up_proj``, ``down_proj`` linears and a SiLU
  ``act_fn`` that computes ``down(silu(gate(x)) * up(x))`` -> :class:`FastGatedMLP`.

Recognising is not trusting: every candidate is run once on random input, the
original and the replacement side by side, and swapped only when they agree (a
Gemma RMSNorm, which scales by ``1 + weight``, looks like Llama's and is left
alone). The original parameters stay in the model (``parameters()`` still
counts them).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from patchbay_kernels.activation import silu_and_mul
from patchbay_kernels.linear import PackedLinear
from patchbay_kernels.norm import rms_norm

#: allowed relative difference of a replacement's output on the check input, by dtype
_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


class FastLinear(nn.Module):
    """``nn.Linear`` (or ``Conv1D``, whose weight is stored transposed) through a prepacked weight."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, transposed: bool = False):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if transposed else (
            weight.shape[1], weight.shape[0])
        w = weight.detach()
        self.linear = PackedLinear(w.t().contiguous() if transposed else w, None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class FastRMSNorm(nn.Module):
    """Llama's RMSNorm (float32 inside, the weight applied after casting back) by the fused kernel."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, float(eps)
        self._w = weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return rms_norm(x.reshape(-1, shape[-1]), self._w, self.eps).view(shape)


class FastGatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up in one prepacked matrix."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        bias = None if gate.bias is None else torch.cat([gate.bias.detach(), up.bias.detach()])
        self.gate_up = PackedLinear(torch.cat([gate.weight.detach(), up.weight.detach()]), bias)
        self.down = PackedLinear(down.weight.detach(), None if down.bias is None else down.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = silu_and_mul(self.gate_up(x.reshape(-1, shape[-1])))
        return self.down(h).view(*shape[:-1], -1)


def _norm_candidate(module: nn.Module) -> FastRMSNorm | None:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, nn.Parameter) or weight.dim() != 1
            or not isinstance(eps, float) or getattr(module, "bias", None) is not None):
        return None
    return FastRMSNorm(weight, eps)


def _mlp_candidate(module: nn.Module) -> FastGatedMLP | None:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    if not all(isinstance(p, nn.Linear) for p in parts) or not isinstance(act, (nn.SiLU, *_silu_classes())):
        return None
    if len(list(module.children())) != 4:  # anything more (a shared expert, a gate) is another kind of MLP
        return None
    return FastGatedMLP(module)


def _silu_classes() -> tuple[type, ...]:
    from transformers import activations

    return tuple(c for c in (getattr(activations, "SiLUActivation", None),) if c is not None)


def _linear_candidate(module: nn.Module) -> FastLinear | None:
    if type(module) is nn.Linear:
        return FastLinear(module.weight, module.bias)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return FastLinear(module.weight, module.bias, transposed=True)
    return None


def _agrees(original: nn.Module, fast: nn.Module, width: int, dtype: torch.dtype, device: torch.device) -> bool:
    x = torch.randn(1, 5, width, generator=torch.Generator().manual_seed(0)).to(dtype=dtype, device=device)
    with torch.inference_mode():
        want, got = original(x), fast(x)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return False
    scale = max(1.0, float(want.abs().max()))
    return float((got.float() - want.float()).abs().max()) <= _TOLERANCE.get(dtype, 0.0) * scale


def _input_width(module: nn.Module, fast: nn.Module) -> int:
    if isinstance(fast, FastLinear):
        return fast.in_features
    if isinstance(fast, FastRMSNorm):
        return fast.weight.shape[0]
    return module.gate_proj.in_features


def swap_layers(model: nn.Module) -> dict[str, int]:
    """Replace what can be replaced (see the module docstring) in ``model``; returns counts by kind."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    done: Counter[str] = Counter()
    for finder in (_mlp_candidate, _norm_candidate, _linear_candidate):
        for parent in list(model.modules()):
            if isinstance(parent, (FastLinear, FastRMSNorm, FastGatedMLP)):
                continue
            for name, child in list(parent.named_children()):
                fast = finder(child)
                if fast is None:
                    continue
                if _agrees(child, fast, _input_width(child, fast), dtype, device):
                    setattr(parent, name, fast)
                    done[type(fast).__name__] += 1
                else:
                    done[f"{type(child).__name__} kept"] += 1
    return dict(done)


def describe(counts: dict[str, Any]) -> str:
    """``"8 FastGatedMLP, 17 FastRMSNorm, ..."`` of :func:`swap_layers`' counts."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"


__all__ = ["FastGatedMLP", "FastLinear", "FastRMSNorm", "describe", "swap_layers"]
