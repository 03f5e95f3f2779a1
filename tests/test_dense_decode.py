"""``dense_decode``: one query per head against a whole token-major K/V (Whisper's cross-attention of a
decode row), by its C++ kernel on CPU and by SDPA without it; both equal SDPA's answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patchbay_kernels import attention
from patchbay_kernels import cpp as kcpp
from patchbay_kernels.attention import dense_decode


def reference(q, k, v, scale):
    return F.scaled_dot_product_attention(q.unsqueeze(1).double(), k.transpose(0, 1).double(),
                                          v.transpose(0, 1).double(), scale=scale).squeeze(1)


@pytest.mark.parametrize("path", ["cpp", "torch"])
@pytest.mark.parametrize("S,H,D", [(1500, 6, 64), (37, 4, 16), (1, 2, 32), (19, 3, 48)])
def test_dense_decode_equals_attention(monkeypatch, path, S, H, D):
    calls = []
    if path == "cpp":
        monkeypatch.delenv("PATCHBAY_NO_CPP_KERNELS", raising=False)
        assert kcpp.error() is None, kcpp.error()
        ops = kcpp.load()

        class Spy:  # the kernel must be what answered
            def dense_decode(self, *args):
                calls.append(args)
                return ops.dense_decode(*args)

        monkeypatch.setattr(kcpp, "load", lambda: Spy())
    else:
        monkeypatch.setenv("PATCHBAY_NO_CPP_KERNELS", "1")
    g = torch.Generator().manual_seed(S + H + D)
    q = torch.randn(3, H, D, generator=g)[1]  # a row of a batch, as the model passes it
    k, v = torch.randn(S, H, D, generator=g) * 3, torch.randn(S, H, D, generator=g)
    out = dense_decode(q, k, v, D ** -0.5)
    assert out.shape == (H, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v, D ** -0.5), rtol=1e-5, atol=1e-5)
    assert len(calls) == (1 if path == "cpp" else 0)
    assert torch.equal(dense_decode(q, k, v, D ** -0.5), out)


@pytest.mark.parametrize("threads", [1, 2])
def test_dense_decode_kernel_bf16_and_threads(threads):
    """bfloat16 in and out (float32 inside), and heads split over two threads, give the same answer."""
    assert kcpp.error() is None, kcpp.error()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        q, k, v = torch.randn(8, 64, generator=g), torch.randn(3000, 8, 64, generator=g), torch.randn(3000, 8, 64, generator=g)
        out = dense_decode(q, k, v, 0.125)
        torch.testing.assert_close(out.double(), reference(q, k, v, 0.125), rtol=1e-5, atol=1e-5)
        low = dense_decode(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125)
        assert low.dtype == torch.bfloat16
        want = reference(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), 0.125)
        torch.testing.assert_close(low.double(), want, rtol=1e-2, atol=1e-2)
    finally:
        torch.set_num_threads(before)


def test_dense_decode_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    """A head size the kernel cannot take (not a multiple of 16) and a strided K go to SDPA."""
    monkeypatch.delenv("PATCHBAY_NO_CPP_KERNELS", raising=False)

    def no_cpp(*args):
        raise AssertionError("the C++ kernel was asked for")

    monkeypatch.setattr(attention.cpp, "ops_for", no_cpp)
    q, k, v = torch.randn(4, 24), torch.randn(50, 4, 24), torch.randn(50, 4, 24)
    torch.testing.assert_close(dense_decode(q, k, v, 0.2).double(), reference(q, k, v, 0.2), rtol=1e-5, atol=1e-5)
    q, k = torch.randn(4, 32), torch.randn(4, 50, 32).transpose(0, 1)
    v = torch.randn(50, 4, 32)
    torch.testing.assert_close(dense_decode(q, k, v, 0.2).double(), reference(q, k, v, 0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_decode_rows_against_their_own_contexts(monkeypatch, dtype):
    """One ``cross_decode`` over a step's rows, each against its own context (of different lengths, one
    of a single token), answers as attention does; and each row's answer is bitwise the same alone or
    in any batch, on one thread, with the helper thread, and over torch's two threads (a greedy
    transcript must not depend on what else was running)."""
    monkeypatch.delenv("PATCHBAY_NO_CPP_KERNELS", raising=False)
    assert kcpp.error() is None, kcpp.error()
    ops, calls = kcpp.load(), []

    class Spy:  # the kernel must be what answered
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    g = torch.Generator().manual_seed(7)
    H, D = 6, 64
    contexts = [(torch.randn(S, H, D, generator=g).to(dtype), (torch.randn(S, H, D, generator=g) * 2).to(dtype))
                for S in (1500, 37, 1500, 1, 200)]
    q = (torch.randn(5, H, D, generator=g) * 3).to(dtype)
    before = torch.get_num_threads()
    answers = []
    try:
        for threads, helper in [(1, False), (1, True), (2, False)]:
            torch.set_num_threads(threads)
            kcpp.allow_helper_thread(helper)
            monkeypatch.setattr(kcpp, "load", lambda: Spy())
            calls.clear()
            out = attention.cross_decode(q, contexts, D ** -0.5)
            assert out.shape == (5, H, D) and out.dtype == dtype and calls == ["cross_decode"]
            alone = [attention.cross_decode(q[n:n + 1], [kv], D ** -0.5)[0] for n, kv in enumerate(contexts)]
            pair = attention.cross_decode(q[[3, 2]], [contexts[3], contexts[2]], D ** -0.5)
            monkeypatch.undo()
            answers.append(out)
            for n in range(5):
                assert torch.equal(out[n], alone[n]), n
            assert torch.equal(pair[0], out[3]) and torch.equal(pair[1], out[2])
    finally:
        monkeypatch.undo()
        kcpp.allow_helper_thread(False)
        torch.set_num_threads(before)
    assert all(torch.equal(a, answers[0]) for a in answers)
    for n, (k, v) in enumerate(contexts):
        want = reference(q[n].float(), k.float(), v.float(), D ** -0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(answers[0][n].double(), want, rtol=tol, atol=tol)


def test_cross_decode_without_the_kernel_and_for_odd_contexts(monkeypatch):
    """Without the C++ kernels (and for a strided context) each row goes to ``dense_decode``'s other path."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 32, generator=g)
    contexts = [(torch.randn(20, 4, 32, generator=g), torch.randn(20, 4, 32, generator=g)),
                (torch.randn(4, 9, 32, generator=g).transpose(0, 1), torch.randn(9, 4, 32, generator=g)),
                (torch.randn(5, 4, 32, generator=g), torch.randn(5, 4, 32, generator=g))]
    want = torch.stack([reference(q[n], k, v, 0.3) for n, (k, v) in enumerate(contexts)])
    torch.testing.assert_close(attention.cross_decode(q, contexts, 0.3).double(), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("PATCHBAY_NO_CPP_KERNELS", "1")
    torch.testing.assert_close(attention.cross_decode(q, contexts, 0.3).double(), want, rtol=1e-5, atol=1e-5)
