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

A batch of a few rows (a decode step of up to :data:`SMALL_ROWS` sequences) is a
matrix-vector product bound by reading the weight from memory; there the C++ kernel
``linear_small`` (``csrc/gemv.cpp``), which streams the plain row-major weight, is
faster than oneDNN's GEMM (measured on one core, 34M-parameter model's layers, float32:
2.75 ms against 3.08 ms at one row, 3.16 against 3.71 at four; bfloat16: 1.24 against
1.69 at one row, and slower than oneDNN from four rows on).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from patchbay_kernels import cpp

#: batch-size hint for the packed layout (any batch size works with it)
_HINT = 32


def _small_rows() -> dict[torch.dtype, int]:
    """Up to how many rows ``linear_small`` beats oneDNN, by dtype: measured on each kind of CPU.
    With AVX-512 (above): 4 rows in float32, 3 in bfloat16. With AVX2 only (AMD EPYC, 2 cores,
    2026-12-03; oneDNN's small-M GEMM is weaker there and it packs no bfloat16): every size the
    kernel takes, e.g. 8 rows over the benchmark llama's linears 10.0-11.0 ms against oneDNN's
    15.5-25.6, over the benchmark Whisper decoder's 4.0-4.2 against 6.0-7.3 (2 threads)."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")()
    if capability.startswith("AVX512"):
        return {torch.float32: 4, torch.bfloat16: 3}
    return {torch.float32: 8, torch.bfloat16: 8}


#: up to this many rows go to the C++ ``linear_small`` kernel, by dtype (measured, see above)
SMALL_ROWS = _small_rows()


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


def _bf16_gemm() -> bool:
    """Whether oneDNN multiplies bfloat16 natively here (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """``y = x @ weight.T + bias``, with ``weight`` ``[out, in]`` prepacked when possible.

    A bfloat16 layer on a CPU without bfloat16 instructions (AVX2: torch multiplies bfloat16 there at
    ~1 GFLOP/s, 100x slower than float32) is packed as a float32 copy and multiplied in float32, the
    output rounded once to bfloat16: what a bfloat16 GEMM computes (exact products, float32 sums).
    The copy costs twice the bfloat16 weight in memory."""

    __slots__ = ("weight", "bias", "packed", "packed_bias", "upcast", "small_rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, small: bool = True):
        """``small=False``: never the ``linear_small`` kernel, so that a row's answer does not depend
        on how many rows share the call (pooling models batch other requests' texts with it;
        oneDNN's rows do not depend on each other, the two kernels' sums differ in the last bits)."""
        self.weight = weight
        self.bias = bias
        self.packed = None
        #: the bias the packed weight is used with (float32 with a float32 copy of a bfloat16 weight)
        self.packed_bias = bias
        #: whether ``packed`` is a float32 copy of a bfloat16 weight
        self.upcast = False
        #: rows up to which ``linear_small`` serves (0: never)
        self.small_rows = 0
        if (weight.dim() == 2 and weight.is_contiguous() and weight.device.type == "cpu"
                and (bias is None or (bias.dtype == weight.dtype and bias.is_contiguous() and bias.dim() == 1))):
            self.small_rows = SMALL_ROWS.get(weight.dtype, 0) if small else 0
        if _can_pack(weight) and (bias is None or bias.dtype == weight.dtype):
            upcast = weight.dtype == torch.bfloat16 and not _bf16_gemm()
            try:
                with torch.no_grad():
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(
                        weight.detach().float() if upcast else weight.detach(), _HINT)
                    if upcast and bias is not None:
                        self.packed_bias = bias.detach().float()
                    self.upcast = upcast
            except RuntimeError:
                self.packed, self.packed_bias = None, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        if x.dim() != 2:
            x = x.reshape(-1, shape[-1])
        if 0 < x.shape[0] <= self.small_rows and x.stride(-1) == 1:
            ops = cpp.ops_for(x, self.weight)
            if ops is not None:
                y = torch.empty(x.shape[0], self.weight.shape[0], dtype=x.dtype)
                ops.linear_small(x, self.weight, self.bias, y)
                return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])
        if self.upcast:  # a float32 copy of a bfloat16 weight
            y = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed, self.packed_bias, "none", [], "").to(x.dtype)
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])
