"""Linear layers with weights prepacked for oneDNN on CPU.

``torch.nn.functional.linear`` hands a plain row-major weight to the BLAS on
every call. On CPU, oneDNN can instead keep the weight in its own blocked
layout, packed once at load (the route torch's inductor takes for frozen
weights): measured here at 1.6-2.2x the speed of ``F.linear`` for the decode
shapes of a 512-wide model (batch 8-32, float32), and on par for large
prefills. :class:`PackedLinear` packs when it can (CPU tensor, float32 or
bfloat16, oneDNN built in) and falls back to ``F.linear`` otherwise; the
packed copy is extra memory the size of the weight. ``PATCHBAY_NO_PACKED_LINEAR=1``
turns packing off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

#: batch-size hint for the packed layout (any batch size works with it)
_HINT = 32


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x @ weight.t() + (bias if bias is not None else 0)


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        os.environ.get("PATCHBAY_NO_PACKED_LINEAR", "") in ("", "0")
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear:
    """``y = x @ weight.T + bias``, with ``weight`` ``[out, in]`` prepacked when possible."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias
        self.packed = None
        if _can_pack(weight):
            try:
                with torch.no_grad():
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _HINT)
                    if bias is not None and bias.dtype != weight.dtype:
                        self.packed = None
            except RuntimeError:
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == self.weight.dtype and x.device.type == "cpu":
            shape = x.shape
            if x.dim() != 2:
                x = x.reshape(-1, shape[-1])
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])
        return F.linear(x, self.weight, self.bias)
