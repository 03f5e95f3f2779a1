"""Soft-capped paged attention (Gemma 2's ``attn_logit_softcapping``): the fast op against its reference,
the reference against transformers' own eager attention, and the cap actually changing the output."""

from __future__ import annotations

import functools

import pytest
import torch

from patchbay_kernels import attention
from patchbay_kernels.attention import paged_attention, reference_paged_attention
from test_kernels import BF16, DTYPES, F32, HEADS, TOL, Step, _one_thread  # noqa: F401 (an autouse fixture)

CAP = 2.0


def capped(fn, softcap=CAP):
    return functools.partial(fn, softcap=softcap)


def sharp(step: Step, gain: float = 4.0) -> Step:
    """Scale the queries so that scores reach well beyond the cap (else capping changes nothing)."""
    step.q = step.q * gain
    return step


@DTYPES
@HEADS
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("cpp", [True, False], ids=["cpp-on", "cpp-off"])
def test_softcap_fast_matches_reference(dtype, hq, hkv, window, cpp, monkeypatch):
    """Decodes, a fresh prefill and one after a cached prefix, with and without a window, whether the C++
    kernels are on or not (a capped step must never reach the uncapped C++ decode)."""
    if not cpp:
        monkeypatch.setenv("PATCHBAY_NO_CPP_KERNELS", "1")
    step = sharp(Step(decodes=[40, 3, 17], prefills=[(30, 30), (50, 20)], hq=hq, hkv=hkv, dtype=dtype,
                      window=window))
    out, kc, vc = step.run(capped(paged_attention))
    ref, rkc, rvc = step.run(capped(reference_paged_attention))
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)
    uncapped, _, _ = step.run(reference_paged_attention)
    assert (out.float() - uncapped.float()).abs().max() > 0.1, "the cap did not change the output"


def test_softcap_decodes_only_skips_the_cpp_decode(monkeypatch):
    def no_cpp_decode(*args, **kwargs):
        raise AssertionError("the uncapped C++ decode ran")

    step = sharp(Step(decodes=[40, 3, 17]))
    monkeypatch.setattr(attention, "_cpp_decode_args", no_cpp_decode)
    out, _, _ = step.run(capped(paged_attention))
    torch.testing.assert_close(out, step.run(capped(reference_paged_attention))[0], **TOL[F32])


def test_softcap_prefill_longer_than_a_query_block(monkeypatch):
    """Query rows are processed in blocks; every block sees its own part of the causal mask."""
    monkeypatch.setattr(attention, "SOFTCAP_QUERY_BLOCK", 16)
    step = sharp(Step(prefills=[(70, 70), (90, 45)], window=20))
    torch.testing.assert_close(step.run(capped(paged_attention))[0],
                               step.run(capped(reference_paged_attention))[0], **TOL[F32])


@pytest.mark.parametrize("window", [None, 5])
def test_reference_softcap_matches_transformers_gemma2_eager(window):
    """The oracle against transformers' own Gemma 2 eager attention (cap, then the mask) on one sequence."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    n, hq, hkv, d = 24, 4, 2, 16
    step = sharp(Step(prefills=[(n, n)], hq=hq, hkv=hkv, d=d, window=window))
    ours, _, _ = step.run(capped(reference_paged_attention))
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (step.q, step.k, step.v))  # [1, H, n, D]
    pos = torch.arange(n)
    keep = pos[None, :] <= pos[:, None]
    if window is not None:
        keep &= pos[None, :] > pos[:, None] - window
    mask = torch.zeros(n, n).masked_fill(~keep, float("-inf"))[None, None]
    module = type("M", (torch.nn.Module,), {})()
    module.num_key_value_groups, module.head_dim = hq // hkv, d
    theirs, _ = eager_attention_forward(module, q4, k4, v4, mask, scaling=step.scale, softcap=CAP)
    torch.testing.assert_close(ours, theirs[0], atol=1e-5, rtol=1e-5)


def test_softcap_bf16_keeps_float32_scores():
    step = sharp(Step(decodes=[33, 8], prefills=[(20, 20)], dtype=BF16))
    out, _, _ = step.run(capped(paged_attention))
    ref, _, _ = step.run(capped(reference_paged_attention))
    assert out.dtype == BF16
    torch.testing.assert_close(out, ref, **TOL[BF16])
