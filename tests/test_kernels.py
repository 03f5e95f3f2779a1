"""Every fast kernel against its ``reference_*`` oracle, and the oracles against independent math."""

from __future__ import annotations

import math
import random

import pytest
import torch

from patchbay_kernels import activation, attention, norm, rotary, sampling
from patchbay_kernels import cpp as kcpp
from patchbay_kernels.attention import (
    AttentionMetadata,
    PrefillChunk,
    paged_attention,
    reference_paged_attention,
    write_kv,
)
from patchbay_kernels.sampling import SamplingTensors


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


F32, BF16 = torch.float32, torch.bfloat16
TOL = {F32: dict(atol=1e-5, rtol=1e-5), BF16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])


def randn(*shape, dtype=F32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


# --------------------------------------------------------------------------- paged attention: harness


class Step:
    """One engine step over a randomly filled, randomly paged KV cache.

    ``decodes``: context lengths of the decode sequences (one new token each);
    ``prefills``: ``(ctx_len, q_len)`` chunks (a cached prefix when ``q_len < ctx_len``).
    Every sequence owns blocks drawn from a shuffled pool, so block tables are
    non-contiguous and out of order; block 0 is in the pool too, so the
    padding slot 0 aliases real data.
    """

    def __init__(self, decodes=(), prefills=(), *, hq=8, hkv=2, d=64, block_size=16, dtype=F32,
                 window=None, seed=0, always_ctx_slots=False, scattered=False, block_table=None):
        gen = torch.Generator().manual_seed(seed)
        self.block_size, self.hkv, self.d = block_size, hkv, d
        lens = [(n, 1) for n in decodes] + list(prefills)
        per_seq = [-(-ctx // block_size) for ctx, _ in lens]
        num_blocks = sum(per_seq) + 3
        pool = torch.randperm(num_blocks, generator=gen).tolist()
        self.k_cache = randn(num_blocks, block_size, hkv, d, dtype=dtype, gen=gen)
        self.v_cache = randn(num_blocks, block_size, hkv, d, dtype=dtype, gen=gen)
        self.seq_slots = []  # each sequence's context slots
        free_slots = torch.randperm(num_blocks * block_size, generator=gen).tolist()
        for n_blocks, (ctx, _) in zip(per_seq, lens):
            if scattered:  # any slots at all, not whole blocks in order
                self.seq_slots.append(torch.tensor([free_slots.pop() for _ in range(ctx)]))
                continue
            table = torch.tensor([pool.pop() for _ in range(n_blocks)])
            self.seq_slots.append((table.unsqueeze(1) * block_size + torch.arange(block_size)).flatten()[:ctx])
        T = sum(q for _, q in lens)
        self.q = randn(T, hq, d, dtype=dtype, gen=gen)
        self.k = randn(T, hkv, d, dtype=dtype, gen=gen)
        self.v = randn(T, hkv, d, dtype=dtype, gen=gen)
        self.scale = d**-0.5

        nd = len(decodes)
        new_slots = [s[ctx - q :] for s, (ctx, q) in zip(self.seq_slots, lens)]
        meta = AttentionMetadata(slot_mapping=torch.cat(new_slots), num_decodes=nd, sliding_window=window)
        if nd:
            max_ctx = max(decodes)
            meta.decode_slots = torch.zeros(nd, max_ctx, dtype=torch.long)
            for i, s in enumerate(self.seq_slots[:nd]):
                meta.decode_slots[i, : len(s)] = s
            meta.decode_ctx_lens = torch.tensor(list(decodes))
            if block_table is not None:  # its dtype; padded with -1 (an error if read) and a spare column
                width = -(-max_ctx // block_size) + 1
                meta.decode_block_table = torch.full((nd, width), -1, dtype=block_table)
                for i, s in enumerate(self.seq_slots[:nd]):
                    blocks = s[::block_size] // block_size
                    meta.decode_block_table[i, : len(blocks)] = blocks
        start = nd
        for s, (ctx, q) in zip(self.seq_slots[nd:], prefills):
            cached = q < ctx or always_ctx_slots
            meta.prefills.append(PrefillChunk(start, start + q, ctx, s if cached else None))
            start += q
        self.meta = meta

    def run(self, fn):
        """``(out, k_cache, v_cache)`` of ``fn`` on a private copy of the cache."""
        kc, vc = self.k_cache.clone(), self.v_cache.clone()
        out = fn(self.q, self.k, self.v, kc, vc, self.meta, self.scale)
        return out, kc, vc


def check_fast_vs_reference(step: Step, dtype):
    out, kc, vc = step.run(paged_attention)
    ref, rkc, rvc = step.run(reference_paged_attention)
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)
    # write_kv: the new tokens' K/V sit at slot_mapping, nothing else changed
    slots = step.meta.slot_mapping
    flat_k, flat_v = kc.view(-1, step.hkv, step.d), vc.view(-1, step.hkv, step.d)
    assert torch.equal(flat_k[slots], step.k) and torch.equal(flat_v[slots], step.v)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], step.k_cache.view(-1, step.hkv, step.d)[untouched])
    assert torch.equal(flat_v[untouched], step.v_cache.view(-1, step.hkv, step.d)[untouched])


@pytest.fixture(params=["cpp", "torch"])
def kernel_path(request, monkeypatch):
    """Decode attention by the C++ kernel (which must build: no silent fallback in the
    tests) or, with ``PATCHBAY_NO_CPP_KERNELS=1``, by the torch path."""
    if request.param == "cpp":
        monkeypatch.delenv("PATCHBAY_NO_CPP_KERNELS", raising=False)
        assert kcpp.error() is None, kcpp.error()

        def no_torch(*args):
            raise AssertionError("the torch decode path ran")

        monkeypatch.setattr(attention, "_decode_torch", no_torch)
    else:
        monkeypatch.setenv("PATCHBAY_NO_CPP_KERNELS", "1")

        def no_cpp():
            raise AssertionError("the C++ kernels were asked for")

        monkeypatch.setattr(kcpp, "load", no_cpp)
    return request.param


HEADS = pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 8)], ids=["gqa", "mha"])
HEAD_DIM = pytest.mark.parametrize("d", [64, 32])
BLOCK = pytest.mark.parametrize("block_size", [16, 1])


# --------------------------------------------------------------------------- paged attention: fast vs reference


@DTYPES
@HEADS
@HEAD_DIM
@BLOCK
def test_decode_batch(dtype, hq, hkv, d, block_size, kernel_path):
    step = Step(decodes=[37, 2, 16, 130, 1, 64], hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=dtype)
    check_fast_vs_reference(step, dtype)


@DTYPES
@HEADS
@BLOCK
def test_decode_single(dtype, hq, hkv, block_size, kernel_path):
    check_fast_vs_reference(Step(decodes=[45], hq=hq, hkv=hkv, block_size=block_size, dtype=dtype), dtype)


@DTYPES
@HEADS
@HEAD_DIM
@BLOCK
def test_prefill_no_prefix(dtype, hq, hkv, d, block_size):
    step = Step(prefills=[(23, 23), (1, 1), (40, 40)], hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=dtype)
    assert all(c.ctx_slots is None for c in step.meta.prefills)
    check_fast_vs_reference(step, dtype)


@DTYPES
@HEADS
@HEAD_DIM
@BLOCK
def test_prefill_with_cached_prefix(dtype, hq, hkv, d, block_size):
    step = Step(prefills=[(50, 20), (17, 1), (33, 32)], hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=dtype)
    assert all(c.ctx_slots is not None for c in step.meta.prefills)
    check_fast_vs_reference(step, dtype)


@DTYPES
@HEADS
def test_prefill_ctx_slots_given_without_prefix(dtype, hq, hkv):
    step = Step(prefills=[(30, 30)], hq=hq, hkv=hkv, dtype=dtype, always_ctx_slots=True)
    check_fast_vs_reference(step, dtype)


@DTYPES
@HEADS
@HEAD_DIM
@BLOCK
def test_mixed_batch(dtype, hq, hkv, d, block_size, kernel_path):
    step = Step(decodes=[70, 3, 33], prefills=[(25, 25), (60, 12), (9, 9)],
                hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=dtype)
    check_fast_vs_reference(step, dtype)


@DTYPES
@HEADS
@BLOCK
@pytest.mark.parametrize("window", [1, 5, 16, 100])
def test_sliding_window(dtype, hq, hkv, block_size, window, kernel_path):
    step = Step(decodes=[40, 3, 17], prefills=[(30, 30), (50, 20)],
                hq=hq, hkv=hkv, block_size=block_size, dtype=dtype, window=window)
    check_fast_vs_reference(step, dtype)


@DTYPES
@HEADS
@pytest.mark.parametrize("window", [None, 6])
def test_slots_not_in_whole_blocks(dtype, hq, hkv, window, kernel_path):
    """Any slot lists work, not only whole blocks in order."""
    step = Step(decodes=[37, 5, 16], prefills=[(20, 20), (40, 15)], hq=hq, hkv=hkv, dtype=dtype,
                window=window, scattered=True)
    check_fast_vs_reference(step, dtype)


@DTYPES
def test_decode_padding_like_the_engine(dtype, kernel_path):
    """Padding taken from whole blocks (block 0 and the tail of each last block), as the
    engine builds ``decode_slots`` from block tables."""
    step = Step(decodes=[37, 5, 64, 17], dtype=dtype)
    meta, bs = step.meta, step.block_size
    width = -(-meta.decode_slots.shape[1] // bs)
    tables = torch.zeros(4, width, dtype=torch.long)
    for i, s in enumerate(step.seq_slots):
        blocks = s[::bs] // bs
        tables[i, : len(blocks)] = blocks
    meta.decode_slots = (tables.unsqueeze(2) * bs + torch.arange(bs)).view(4, -1)[:, : meta.decode_slots.shape[1]]
    check_fast_vs_reference(step, dtype)


@DTYPES
def test_decode_from_block_table_alone(dtype, kernel_path):
    """The engine passes a block table and no slots: the torch path derives the slots from the
    table (its -1 padding never read as a slot), the C++ kernel walks the table."""
    step = Step(decodes=[37, 5, 64, 17], prefills=[(20, 12)], dtype=dtype, block_table=torch.long)
    ref, rkc, rvc = step.run(reference_paged_attention)
    step.meta.decode_slots = None
    out, kc, vc = step.run(paged_attention)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)
    torch.testing.assert_close(step.run(reference_paged_attention)[0], ref, atol=0, rtol=0)


def test_metadata_reused_across_layers_and_replaced_window():
    """Derived tensors are cached on the metadata for the layers of a step; a
    ``dataclasses.replace`` copy with another window must not see them."""
    import dataclasses

    step = Step(decodes=[40, 9, 23], prefills=[(12, 12)])
    out1, _, _ = step.run(paged_attention)
    out2, _, _ = step.run(paged_attention)
    assert torch.equal(out1, out2)
    windowed = Step(decodes=[40, 9, 23], prefills=[(12, 12)])
    windowed.meta = dataclasses.replace(step.meta, sliding_window=4)
    out3, _, _ = windowed.run(paged_attention)
    ref3, _, _ = windowed.run(reference_paged_attention)
    torch.testing.assert_close(out3, ref3, **TOL[F32])
    assert not torch.allclose(out3, out1)


def test_large_decode_and_prefill(kernel_path):
    """Engine-sized shapes: a 32-sequence decode batch and a long chunk."""
    rng = random.Random(0)
    step = Step(decodes=[rng.randint(128, 300) for _ in range(32)], prefills=[(700, 300)], hkv=8)
    check_fast_vs_reference(step, F32)


def test_returns_fresh_tensor_and_keeps_inputs():
    step = Step(decodes=[20, 5], prefills=[(12, 12)])
    q, k, v = step.q.clone(), step.k.clone(), step.v.clone()
    out, _, _ = step.run(paged_attention)
    assert torch.equal(step.q, q) and torch.equal(step.k, k) and torch.equal(step.v, v)
    assert out.data_ptr() != step.q.data_ptr()


SHAPES = {
    "decode": dict(decodes=[20, 7]),
    "prefix": dict(prefills=[(30, 10)]),
    "fresh": dict(prefills=[(9, 9)]),
    "mixed": dict(decodes=[20, 7], prefills=[(30, 10)]),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=list(SHAPES))
@DTYPES
def test_output_survives_the_next_call(shape, dtype):
    """Scratch buffers are reused across calls (layers): a returned tensor must not live in them."""
    first, second = Step(dtype=dtype, seed=1, **shape), Step(dtype=dtype, seed=2, **shape)
    out, _, _ = first.run(paged_attention)
    kept = out.clone()
    second.run(paged_attention)
    assert torch.equal(out, kept)


def test_inference_mode_then_plain():
    """The scratch buffers outlive the mode they were made in: the engine runs in
    inference mode, a test or tool may call the same kernels outside it."""
    steps = [Step(decodes=[90, 7], prefills=[(120, 30)], seed=1), Step(decodes=[20, 5], prefills=[(30, 6)], seed=2)]
    for step, mode in zip(steps + steps[1:], (True, False, True)):
        with torch.inference_mode(mode):
            out, _, _ = step.run(paged_attention)
        torch.testing.assert_close(out, step.run(reference_paged_attention)[0], **TOL[F32])


def test_noncontiguous_qkv_views(kernel_path):
    """The model passes q, k, v as column slices of one fused qkv projection."""
    step = Step(decodes=[20, 41], prefills=[(30, 10), (8, 8)], hq=8, hkv=2)
    T, hq, hkv, d = step.q.shape[0], 8, 2, 64
    qkv = torch.cat([step.q.view(T, -1), step.k.view(T, -1), step.v.view(T, -1)], dim=1)
    q = qkv[:, : hq * d].view(T, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(T, hkv, d)
    kc, vc = step.k_cache.clone(), step.v_cache.clone()
    out = paged_attention(q, k, v, kc, vc, step.meta, step.scale)
    ref, _, _ = step.run(reference_paged_attention)
    torch.testing.assert_close(out, ref, **TOL[F32])


def test_write_kv():
    kc, vc = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv(k, v, kc, vc, torch.tensor([17, 0, 63]))
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(kc[0, 0], k[1]) and torch.equal(kc[3, 15], k[2])
    assert torch.equal(vc[1, 1], v[0]) and torch.equal(vc[0, 0], v[1]) and torch.equal(vc[3, 15], v[2])
    assert int((kc != 0).any(-1).any(-1).sum()) == 3


# --------------------------------------------------------------------------- paged attention: the C++ decode kernel


@pytest.fixture
def cpp(monkeypatch):
    """The C++ ops, which must have built (a build failure fails the test, never skips it); the
    torch decode path must not run."""
    monkeypatch.delenv("PATCHBAY_NO_CPP_KERNELS", raising=False)
    assert kcpp.error() is None, kcpp.error()

    def no_torch(*args):
        raise AssertionError("the torch decode path ran")

    monkeypatch.setattr(attention, "_decode_torch", no_torch)
    return kcpp.load()


TABLES = pytest.mark.parametrize("block_table", [None, torch.long, torch.int32], ids=["slots", "table64", "table32"])


@DTYPES
@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 8), (12, 3), (4, 1)], ids=["gqa4", "mha", "gqa4x3", "mqa"])
@pytest.mark.parametrize("block_size", [16, 1, 32])
@TABLES
def test_cpp_decode(cpp, dtype, hq, hkv, block_size, block_table):
    """Shuffled block tables, contexts of 1 token to several chunks of the kernel, padded lengths."""
    step = Step(decodes=[37, 1, 16, 130, 2, 64, 200], hq=hq, hkv=hkv, block_size=block_size, dtype=dtype,
                block_table=block_table)
    check_fast_vs_reference(step, dtype)


@DTYPES
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("block_size", [16, 1])
def test_cpp_decode_head_dims(cpp, dtype, d, block_size):
    step = Step(decodes=[65, 3, 128], hq=8, hkv=2, d=d, block_size=block_size, dtype=dtype, block_table=torch.long)
    check_fast_vs_reference(step, dtype)


@DTYPES
@pytest.mark.parametrize("window", [1, 2, 15, 64, 65, 1000])
@TABLES
def test_cpp_decode_sliding_window(cpp, dtype, window, block_table):
    step = Step(decodes=[1, 64, 65, 130, 200], block_table=block_table, dtype=dtype, window=window)
    check_fast_vs_reference(step, dtype)


def test_cpp_decode_context_one(cpp):
    step = Step(decodes=[1, 1, 1], block_table=torch.long)
    out, _, _ = step.run(paged_attention)
    torch.testing.assert_close(out, step.v.repeat_interleave(4, dim=1), atol=1e-6, rtol=0)  # its own V


@pytest.mark.parametrize("threads", [2, 3])
@DTYPES
def test_cpp_decode_threads(cpp, dtype, threads):
    """Work items split over threads: one sequence (its heads split), a few, many of unequal lengths."""
    rng = random.Random(3)
    torch.set_num_threads(threads)
    try:
        for decodes in ([300], [5, 300], [rng.randint(1, 300) for _ in range(33)]):
            for hkv in (8, 2):
                check_fast_vs_reference(Step(decodes=decodes, hkv=hkv, dtype=dtype, block_table=torch.long), dtype)
    finally:
        torch.set_num_threads(1)


def test_cpp_decode_large_logits(cpp):
    """Scores far apart (a spiky softmax) and far from 0: the online max must be exact."""
    step = Step(decodes=[150, 70], block_table=torch.long)
    step.q *= 40
    check_fast_vs_reference(step, F32)
    step.q = step.q / 40 + 200  # all scores large and positive
    check_fast_vs_reference(step, F32)


def test_cpp_decode_matches_torch_path(monkeypatch):
    """The two decode paths agree closely in float32 (each against the reference is tested above)."""
    monkeypatch.delenv("PATCHBAY_NO_CPP_KERNELS", raising=False)
    assert kcpp.error() is None, kcpp.error()
    torch_runs = []
    decode_torch = attention._decode_torch
    monkeypatch.setattr(attention, "_decode_torch", lambda *a: torch_runs.append(1) or decode_torch(*a))
    step = Step(decodes=[100, 3, 250, 17], hq=16, hkv=4, block_table=torch.long)
    out_cpp, _, _ = step.run(paged_attention)
    assert not torch_runs
    monkeypatch.setenv("PATCHBAY_NO_CPP_KERNELS", "1")
    out_torch, _, _ = step.run(paged_attention)
    assert torch_runs
    torch.testing.assert_close(out_cpp, out_torch, atol=1e-5, rtol=1e-5)


def test_cpp_decode_bad_metadata_raises(cpp):
    """A block id out of the cache or a context longer than the table is an error, not a wild read."""
    step = Step(decodes=[40, 20], block_table=torch.long)
    step.meta.decode_block_table[1, 0] = step.k_cache.shape[0]
    with pytest.raises(RuntimeError, match="out of range"):
        step.run(paged_attention)
    step = Step(decodes=[40, 20], block_table=torch.long)
    step.meta.decode_block_table = step.meta.decode_block_table[:, :2]  # 32 slots for 40 tokens
    with pytest.raises(RuntimeError, match="exceeds the table"):
        step.run(paged_attention)


def test_cpp_decode_table_derived_once_per_step(cpp):
    """The op's table and lengths come from the metadata once, not per layer; a replaced
    table (or window) is seen."""
    step = Step(decodes=[40, 9], block_table=torch.long)
    step.run(paged_attention)
    args = step.meta._derived["cpp_decode"][1]
    step.run(paged_attention)
    assert step.meta._derived["cpp_decode"][1] is args
    step.meta.decode_block_table = step.meta.decode_block_table.to(torch.int32)
    step.meta.decode_block_table[1, 1:] = step.k_cache.shape[0]  # past the context: never read
    check_fast_vs_reference(step, F32)
    assert step.meta._derived["cpp_decode"][1][0] is not args[0]


@DTYPES
def test_cpp_write_kv(cpp, dtype):
    """The C++ row copy against index_copy_, k and v as column slices of a fused qkv."""
    gen = torch.Generator().manual_seed(0)
    T, hq, hkv, d = 7, 8, 2, 64
    qkv = randn(T, (hq + 2 * hkv) * d, dtype=dtype, gen=gen)
    k = qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(T, hkv, d)
    slots = torch.tensor([5, 0, 99, 17, 16, 63, 40])
    kc, vc = randn(7, 16, hkv, d, dtype=dtype, gen=gen), randn(7, 16, hkv, d, dtype=dtype, gen=gen)
    rkc, rvc = kc.clone(), vc.clone()
    write_kv(k, v, kc, vc, slots)
    attention._write_kv_torch(k, v, rkc, rvc, slots)
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)
    with pytest.raises(RuntimeError, match="out of range"):
        write_kv(k, v, kc, vc, slots + 100)


def test_fallback_warns_once_and_works(monkeypatch, caplog):
    """float16 (or a head_dim the kernel does not take) goes to the torch path with one
    warning naming the reason; the result is still right."""
    monkeypatch.delenv("PATCHBAY_NO_CPP_KERNELS", raising=False)
    monkeypatch.setattr(kcpp, "_warned", set())
    step = Step(decodes=[30, 4], prefills=[(12, 12)], dtype=torch.float16, block_table=torch.long)
    with caplog.at_level("WARNING", logger="patchbay.kernels"):
        for _ in range(3):
            out, _, _ = step.run(paged_attention)
    assert len(caplog.records) == 1 and "float16" in caplog.records[0].getMessage()
    torch.testing.assert_close(out, step.run(reference_paged_attention)[0], **TOL[BF16])
    caplog.clear()
    step = Step(decodes=[30, 4], d=24)
    with caplog.at_level("WARNING", logger="patchbay.kernels"):
        out, _, _ = step.run(paged_attention)
        step.run(paged_attention)
    assert len(caplog.records) == 1 and "head_dim 24" in caplog.records[0].getMessage()
    torch.testing.assert_close(out, step.run(reference_paged_attention)[0], **TOL[F32])


def test_build_failure_falls_back(monkeypatch, caplog):
    """A failed build (no compiler, no ninja, a compile error) logs why and the torch path serves."""
    monkeypatch.delenv("PATCHBAY_NO_CPP_KERNELS", raising=False)
    monkeypatch.setattr(kcpp, "_warned", set())
    monkeypatch.setattr(kcpp, "_state", {})

    def fail():
        raise RuntimeError("Error building extension: no compiler")

    monkeypatch.setattr(kcpp, "_build", fail)
    step = Step(decodes=[30, 4])
    with caplog.at_level("WARNING", logger="patchbay.kernels"):
        out, _, _ = step.run(paged_attention)
        step.run(paged_attention)
    assert len(caplog.records) == 1 and "no compiler" in caplog.records[0].getMessage()
    assert kcpp.error() == "RuntimeError: Error building extension: no compiler"
    torch.testing.assert_close(out, step.run(reference_paged_attention)[0], **TOL[F32])


# --------------------------------------------------------------------------- paged attention: the oracle itself


def dense_attention(q, k, v, scale, window=None):
    """Causal softmax attention of one contiguous sequence, in float64: ``[n, Hq, D]``."""
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    out = torch.empty_like(q)
    for i in range(n):
        lo = 0 if window is None else max(0, i - window + 1)
        for h in range(hq):
            w = torch.softmax((k[lo : i + 1, h] @ q[i, h]) * scale, dim=0)
            out[i, h] = w @ v[lo : i + 1, h]
    return out


@pytest.mark.parametrize("fn", [reference_paged_attention, paged_attention], ids=["reference", "fast"])
@HEADS
@BLOCK
@pytest.mark.parametrize("window", [None, 7])
def test_paged_matches_dense_over_a_generation(fn, hq, hkv, block_size, window, kernel_path):
    """Replay two sequences through chunked prefill then decode steps (mixed batches):
    every output row equals dense causal attention over the contiguous sequence."""
    gen = torch.Generator().manual_seed(1)
    d, lens = 32, [45, 29]
    seqs = [(randn(n, hq, d, gen=gen), randn(n, hkv, d, gen=gen), randn(n, hkv, d, gen=gen)) for n in lens]
    expected = [dense_attention(q, k, v, d**-0.5, window) for q, k, v in seqs]
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    slots = []
    for n in lens:
        table = torch.tensor([pool.pop() for _ in range(-(-n // block_size))])
        slots.append((table.unsqueeze(1) * block_size + torch.arange(block_size)).flatten()[:n])
    kc = torch.full((num_blocks, block_size, hkv, d), 1e4)  # stale garbage: must never be attended
    vc = torch.full((num_blocks, block_size, hkv, d), 1e4)
    # per step: (kind, sequence, start, end); decodes first. Sequence 1 decodes while 0 still prefills.
    schedule = [
        [("p", 0, 0, 20), ("p", 1, 0, 25)],
        [("d", 1, 25, 26), ("p", 0, 20, 40)],
        [("d", 1, 26, 27), ("p", 0, 40, 41)],  # a one-token chunk after a cached prefix
        [("d", 0, 41, 42), ("d", 1, 27, 28)],
        [("d", 1, 28, 29), ("d", 0, 42, 43)],
        [("d", 0, 43, 44)],
        [("p", 0, 44, 45)],
    ]
    done = [0, 0]
    for runs in schedule:
        decodes = [r for r in runs if r[0] == "d"]
        meta = AttentionMetadata(slot_mapping=torch.cat([slots[s][a:b] for _, s, a, b in runs]),
                                 num_decodes=len(decodes), sliding_window=window)
        if decodes:
            width = max(b for *_, b in decodes)
            meta.decode_slots = torch.zeros(len(decodes), width, dtype=torch.long)
            for i, (_, s, _, b) in enumerate(decodes):
                meta.decode_slots[i, :b] = slots[s][:b]
            meta.decode_ctx_lens = torch.tensor([b for *_, b in decodes])
        start = len(decodes)
        for _, s, a, b in runs[len(decodes) :]:
            meta.prefills.append(PrefillChunk(start, start + b - a, b, slots[s][:b] if a else None))
            start += b - a
        q, k, v = (torch.cat([seqs[s][i][a:b] for _, s, a, b in runs]) for i in range(3))
        out = fn(q, k, v, kc, vc, meta, d**-0.5)
        row = 0
        for _, s, a, b in runs:
            assert a == done[s]
            torch.testing.assert_close(out[row : row + b - a].double(), expected[s][a:b], atol=1e-5, rtol=1e-5)
            row += b - a
            done[s] = b
    assert done == lens
    for s, (_, k, v) in enumerate(seqs):
        assert torch.equal(kc.view(-1, hkv, d)[slots[s]], k) and torch.equal(vc.view(-1, hkv, d)[slots[s]], v)


# --------------------------------------------------------------------------- norm, activation


@pytest.fixture(params=["cpp", "torch"])
def fused_path(request, monkeypatch):
    """The row-wise ops by their C++ kernels (which must build, and must be the ones that ran:
    the returned list names every C++ op called) or by their torch paths (returns None)."""
    if request.param == "torch":
        monkeypatch.setenv("PATCHBAY_NO_CPP_KERNELS", "1")
        return None
    monkeypatch.delenv("PATCHBAY_NO_CPP_KERNELS", raising=False)
    assert kcpp.error() is None, kcpp.error()
    real, calls = kcpp.load(), []

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(real, name)(*args)

            return call

    monkeypatch.setattr(kcpp, "load", Spy)
    return calls


def ran(path, op):
    """The C++ ``op`` ran on the C++ path (always true on the torch path)."""
    return path is None or op in path


@pytest.fixture
def threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


@DTYPES
@pytest.mark.parametrize("shape", [(1, 512), (7, 512), (300, 64), (5, 8, 32), (600, 512)])
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_rms_norm(dtype, shape, fused_path, threads):
    gen = torch.Generator().manual_seed(0)
    x = randn(*shape, dtype=dtype, gen=gen) * 3
    w = (1 + 0.1 * randn(shape[-1], gen=gen)).to(dtype)
    out = norm.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, norm.reference_rms_norm(x, w, 1e-6), **TOL[dtype])
    assert ran(fused_path, "rms_norm")


@DTYPES
def test_rms_norm_noncontiguous_heads(dtype, fused_path):
    """Per-head q/k norm (Qwen3) on a column slice of a fused qkv."""
    qkv = randn(6, 12 * 32, dtype=dtype)
    k = qkv[:, 8 * 32 : 10 * 32].view(6, 2, 32)
    w = (1 + 0.1 * randn(32)).to(dtype)
    torch.testing.assert_close(norm.rms_norm(k, w, 1e-6), norm.reference_rms_norm(k, w, 1e-6), **TOL[dtype])
    assert ran(fused_path, "rms_norm")


@DTYPES
@pytest.mark.parametrize("rows", [1, 9, 256])
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_add_rms_norm(dtype, rows, fused_path, threads):
    gen = torch.Generator().manual_seed(0)
    x, res = randn(rows, 512, dtype=dtype, gen=gen), randn(rows, 512, dtype=dtype, gen=gen)
    w = (1 + 0.1 * randn(512, gen=gen)).to(dtype)
    ref_normed, ref_sum = norm.reference_add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    normed, summed = norm.add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    torch.testing.assert_close(summed, ref_sum, atol=0, rtol=0)
    torch.testing.assert_close(normed, ref_normed, **TOL[dtype])
    assert ran(fused_path, "add_rms_norm")


@DTYPES
@pytest.mark.parametrize("shape", [(1, 2 * 1408), (33, 2 * 1408), (4, 3, 2 * 16), (3, 2 * 20)])
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_silu_and_mul(dtype, shape, fused_path, threads):
    x = randn(*shape, dtype=dtype) * 4
    x.view(-1, shape[-1])[0, :4] = torch.tensor([0.0, -90.0, 90.0, -1e-3], dtype=dtype)  # e^x under- and overflow, the sign change
    out = activation.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    torch.testing.assert_close(out, activation.reference_silu_and_mul(x), **TOL[dtype])
    # rounded exactly as torch's own silu-then-multiply rounds
    d = shape[-1] // 2
    torch.testing.assert_close(out, torch.nn.functional.silu(x[..., :d]) * x[..., d:], atol=1e-5, rtol=1e-5)
    assert ran(fused_path, "silu_and_mul") or len(shape) == 3


def test_reference_silu_and_mul_formula():
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    expected = torch.tensor([[1.0 / (1 + math.exp(-1.0)) * 3.0, -2.0 / (1 + math.exp(2.0)) * 0.5]])
    torch.testing.assert_close(activation.reference_silu_and_mul(x), expected)


# --------------------------------------------------------------------------- rotary


def _rope_module(**overrides):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(LlamaConfig(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # default llama: head_dim 128, theta 10000
        dict(hidden_size=512, num_attention_heads=8, max_position_embeddings=4096),
        dict(hidden_size=256, num_attention_heads=8, rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
        dict(hidden_size=512, num_attention_heads=8, max_position_embeddings=8192,
             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                  original_max_position_embeddings=2048)),
    ],
    ids=["default", "hidden512", "theta5e5", "yarn"],
)
def test_cos_sin_cache_matches_transformers(overrides):
    emb = _rope_module(**overrides)
    n = emb.max_seq_len_cached
    cos, sin = rotary.cos_sin_cache(emb.inv_freq, n, emb.attention_scaling)
    assert cos.shape == sin.shape == (n, emb.inv_freq.numel()) and cos.dtype == torch.float32
    positions = torch.arange(n).unsqueeze(0)
    hf_cos, hf_sin = emb(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(torch.cat((cos, cos), -1), hf_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat((sin, sin), -1), hf_sin[0], atol=1e-6, rtol=0)


@DTYPES
@pytest.mark.parametrize("T,hq,hkv,d", [(1, 8, 8, 64), (37, 8, 2, 64), (300, 4, 4, 32)])
def test_apply_rotary(dtype, T, hq, hkv, d):
    gen = torch.Generator().manual_seed(0)
    cos_t, sin_t = rotary.cos_sin_cache(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), 4096)
    pos = torch.randint(0, 4096, (T,), generator=gen)
    q, k = randn(T, hq, d, dtype=dtype, gen=gen), randn(T, hkv, d, dtype=dtype, gen=gen)
    q0, k0 = q.clone(), k.clone()
    ref_q, ref_k = rotary.reference_apply_rotary(q, k, cos_t[pos], sin_t[pos])
    out_q, out_k = rotary.apply_rotary(q, k, cos_t[pos], sin_t[pos])
    assert out_q.dtype == out_k.dtype == dtype
    torch.testing.assert_close(out_q, ref_q, **TOL[dtype])
    torch.testing.assert_close(out_k, ref_k, **TOL[dtype])
    assert torch.equal(q, q0) and torch.equal(k, k0)


@DTYPES
def test_apply_rotary_noncontiguous_views(dtype):
    T, hq, hkv, d = 5, 8, 2, 64
    qkv = randn(T, (hq + 2 * hkv) * d, dtype=dtype)
    q, k = qkv[:, : hq * d].view(T, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
    cos, sin = rotary.cos_sin_cache(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), 64)
    pos = torch.tensor([0, 1, 2, 40, 63])
    ref = rotary.reference_apply_rotary(q.clone(), k.clone(), cos[pos], sin[pos])
    out = rotary.apply_rotary(q, k, cos[pos], sin[pos])
    torch.testing.assert_close(out[0], ref[0], **TOL[dtype])
    torch.testing.assert_close(out[1], ref[1], **TOL[dtype])


def test_reference_rotary_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    emb = _rope_module(hidden_size=512, num_attention_heads=8)
    T, hq, hkv, d = 11, 8, 2, 64
    q, k = torch.randn(T, hq, d), torch.randn(T, hkv, d)
    pos = torch.tensor([0, 1, 2, 3, 100, 101, 7, 2047, 5, 5, 9])
    hf_cos, hf_sin = emb(q, pos.unsqueeze(0))
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), hf_cos, hf_sin)
    cos, sin = rotary.cos_sin_cache(emb.inv_freq, 2048, emb.attention_scaling)
    for fn in (rotary.reference_apply_rotary, rotary.apply_rotary):
        out_q, out_k = fn(q, k, cos[pos], sin[pos])
        torch.testing.assert_close(out_q, hf_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_k, hf_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def _rope_case(T, hq, hkv, d, dtype, qk_norm, seed=0, num_blocks=40, block_size=16):
    gen = torch.Generator().manual_seed(seed)
    qkv = randn(T, (hq + 2 * hkv) * d, dtype=dtype, gen=gen)
    cos, sin = rotary.cos_sin_cache(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), 4096)
    pos = torch.randint(0, 4096, (T,), generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    norms = (None, None)
    if qk_norm:
        norms = tuple((1 + 0.1 * randn(d, gen=gen)).to(dtype) for _ in range(2))
    caches = [randn(num_blocks, block_size, hkv, d, dtype=dtype, gen=gen) for _ in range(2)]
    return qkv, pos, cos, sin, norms, caches, slots


@DTYPES
@pytest.mark.parametrize("T,hq,hkv,d", [(1, 8, 8, 64), (37, 8, 2, 64), (300, 4, 4, 32), (5, 4, 1, 128)])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_rope_qkv(dtype, T, hq, hkv, d, qk_norm, fused_path, threads):
    """Split + q/k norm + rotary + K/V written to the cache, against the reference chain."""
    qkv, pos, cos, sin, (qn, kn), (kc, vc), slots = _rope_case(T, hq, hkv, d, dtype, qk_norm)
    qkv0 = qkv.clone()
    rkc, rvc = kc.clone(), vc.clone()
    rq, rk, rv = rotary.reference_rope_qkv(qkv, pos, cos, sin, qn, kn, 1e-6, hq, rkc, rvc, slots)
    q, k, v = rotary.rope_qkv(qkv, pos, cos, sin, qn, kn, 1e-6, hq, kc, vc, slots)
    assert q.shape == (T, hq, d) and k.shape == v.shape == (T, hkv, d) and q.dtype == k.dtype == dtype
    torch.testing.assert_close(q, rq, **TOL[dtype])
    torch.testing.assert_close(k, rk, **TOL[dtype])
    assert torch.equal(v, rv) and torch.equal(qkv, qkv0)
    torch.testing.assert_close(kc, rkc, **TOL[dtype])
    assert torch.equal(vc, rvc)
    untouched = torch.ones(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(kc.view(-1, hkv, d)[untouched], rkc.view(-1, hkv, d)[untouched])
    assert ran(fused_path, "rope_qkv")


def test_rope_qkv_without_k(fused_path):
    """A decode-only step asks for no K tensor: the cache still gets it."""
    qkv, pos, cos, sin, _, (kc, vc), slots = _rope_case(4, 8, 2, 64, F32, False)
    rkc, rvc = kc.clone(), vc.clone()
    rq, _, _ = rotary.reference_rope_qkv(qkv, pos, cos, sin, None, None, 1e-6, 8, rkc, rvc, slots)
    q, k, _ = rotary.rope_qkv(qkv, pos, cos, sin, None, None, 1e-6, 8, kc, vc, slots, need_k=False)
    assert fused_path is None or k is None
    torch.testing.assert_close(q, rq, **TOL[F32])
    torch.testing.assert_close(kc, rkc, **TOL[F32])
    assert torch.equal(vc, rvc)


def test_rope_qkv_rejects_bad_positions_and_slots(cpp):
    qkv, pos, cos, sin, _, (kc, vc), slots = _rope_case(3, 8, 2, 64, F32, False)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        rotary.rope_qkv(qkv, pos + 4096, cos, sin, None, None, 1e-6, 8, kc, vc, slots)
    with pytest.raises(RuntimeError, match="out of range"):
        rotary.rope_qkv(qkv, pos, cos, sin, None, None, 1e-6, 8, kc, vc, slots + 10_000)


# --------------------------------------------------------------------------- sampling


def st_of(n, temperature=1.0, top_k=None, top_p=None, min_p=None, seeds=None):
    """SamplingTensors for ``n`` rows; each parameter a scalar or a per-row list (None: filter unused)."""

    def col(x, dtype):
        return None if x is None else torch.tensor(x if isinstance(x, list) else [x] * n, dtype=dtype)

    temp = col(temperature, torch.float32)
    gens = {} if seeds is None else {i: torch.Generator().manual_seed(s) for i, s in enumerate(seeds) if s is not None}
    return SamplingTensors(temperature=temp, top_k=col(top_k, torch.long), top_p=col(top_p, torch.float32),
                           min_p=col(min_p, torch.float32), generators=gens, all_greedy=bool((temp == 0).all()))


def random_logits(n, vocab, seed=0, spread=3.0):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * spread


PROB_CASES = {
    "temperature": dict(temperature=[1.0, 0.5, 2.0, 1e-3]),
    "top_k": dict(top_k=[1, 5, 0, 100000]),  # 0 = off, > vocab = off
    "top_p": dict(top_p=[0.9, 1.0, 0.5, 1e-6]),
    "min_p": dict(min_p=[0.1, 0.0, 0.5, 0.999]),
    "top_k+top_p": dict(top_k=[10, 3, 0, 50], top_p=[0.8, 0.95, 0.3, 1.0]),
    "all": dict(temperature=[0.7, 1.3, 1.0, 0.9], top_k=[20, 0, 5, 64], top_p=[0.9, 0.7, 1.0, 0.95],
                min_p=[0.05, 0.2, 0.0, 0.01]),
}


@pytest.mark.parametrize("case", PROB_CASES, ids=list(PROB_CASES))
@pytest.mark.parametrize("vocab", [64, 1000])
def test_probs_from_logits(case, vocab):
    logits = random_logits(4, vocab)
    st = st_of(4, **PROB_CASES[case])
    probs = sampling.probs_from_logits(logits, st)
    ref = sampling.reference_probs(logits, st)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(probs > 0, ref > 0)  # same support


def test_probs_edge_cases():
    logits = torch.tensor([
        [1.0, 2.0, 2.0, 0.5, 2.0, -1.0],  # ties at the top-2 boundary: top-k keeps every tie
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # all equal
        [5.0, float("-inf"), 1.0, 1.0, float("-inf"), 0.0],  # masked-out tokens
        [3.0, 1.0, 0.0, -2.0, 0.5, 0.2],
    ])
    st = st_of(4, top_k=[2, 3, 2, 1], top_p=[1.0, 1.0, 0.99, 1.0])
    probs = sampling.probs_from_logits(logits, st)
    ref = sampling.reference_probs(logits, st)
    torch.testing.assert_close(probs, ref)
    assert torch.equal(probs[0] > 0, torch.tensor([False, True, True, False, True, False]))
    assert torch.equal(probs[1], torch.full((6,), 1 / 6))
    assert probs[2, 1] == 0 and probs[2, 4] == 0
    assert torch.equal(probs[3], torch.tensor([1.0, 0, 0, 0, 0, 0]))  # top_k=1 is argmax
    # top_p = 1 and top_k = vocab change nothing
    st = st_of(4, top_k=6, top_p=1.0)
    torch.testing.assert_close(sampling.probs_from_logits(logits, st), logits.softmax(-1))


def test_top_p_ties_and_extremes():
    logits = torch.zeros(4, 8)
    logits[2, 0] = 5.0
    logits[3] = torch.tensor([3.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    st = st_of(4, top_p=[0.5, 0.0, 0.0, 0.8])
    probs = sampling.probs_from_logits(logits, st)
    torch.testing.assert_close(probs, sampling.reference_probs(logits, st))
    assert torch.equal(probs[0], torch.full((8,), 1 / 8))  # the cut falls inside a tie: all of it kept
    assert torch.equal(probs[1], torch.full((8,), 1 / 8))  # top_p = 0 keeps the top token and its ties
    assert torch.equal(probs[2], torch.eye(8)[0])
    assert torch.equal(probs[3] > 0, torch.tensor([True] * 4 + [False] * 4))


def test_top_p_wide_nucleus():
    """Nuclei of thousands of tokens (the candidate set must widen) next to a narrow one."""
    logits = torch.stack([torch.linspace(0.0, 1.0, 5000), random_logits(1, 5000, spread=8)[0], torch.zeros(5000)])
    st = st_of(3, top_p=[0.9, 0.95, 1.0], top_k=[0, 4000, 0])
    probs = sampling.probs_from_logits(logits, st)
    ref = sampling.reference_probs(logits, st)
    torch.testing.assert_close(probs, ref, atol=1e-7, rtol=1e-5)
    assert torch.equal(probs > 0, ref > 0)
    assert 4000 < int((probs[0] > 0).sum()) < 5000 and int((probs[2] > 0).sum()) == 5000


def test_reference_probs_by_hand():
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = p.log().unsqueeze(0)

    def ref(**params):
        return sampling.reference_probs(logits, st_of(1, **params))[0]

    torch.testing.assert_close(ref(top_p=0.7), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    torch.testing.assert_close(ref(top_k=3), torch.tensor([0.5, 0.25, 0.15, 0]) / 0.9)
    torch.testing.assert_close(ref(min_p=0.4), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    torch.testing.assert_close(ref(temperature=0.5), p**2 / (p**2).sum())  # temperature sharpens first


def test_greedy_rows():
    logits = random_logits(5, 300, seed=3)
    st = st_of(5, temperature=[0.0, 1.0, 0.0, 0.8, 0.0], top_k=[0, 10, 5, 0, 1], seeds=[None, 1, None, 2, 3])
    expected = logits.argmax(-1)
    for _ in range(3):
        tokens = sampling.sample(logits, st)
        assert tokens.dtype == torch.long and tokens.shape == (5,)
        assert tokens[[0, 2, 4]].tolist() == expected[[0, 2, 4]].tolist()
    ref = sampling.reference_probs(logits, st)
    assert torch.equal(ref[[0, 2, 4]].argmax(-1), expected[[0, 2, 4]])
    all_greedy = st_of(5, temperature=0.0)
    assert all_greedy.all_greedy and torch.equal(sampling.sample(logits, all_greedy), expected)


@pytest.mark.parametrize("case", PROB_CASES, ids=list(PROB_CASES))
def test_seeded_sample_matches_reference(case):
    """With a generator on every random row the reference is deterministic and the fast
    path must draw the very same tokens, step after step."""
    params = dict(PROB_CASES[case])
    params.setdefault("temperature", [1.0, 0.8, 0.0, 1.2])
    make = lambda: st_of(4, seeds=[11, 12, 13, 14], **params)  # noqa: E731
    st_fast, st_ref = make(), make()
    for step in range(5):
        logits = random_logits(4, 500, seed=step, spread=2.0)
        assert sampling.sample(logits, st_fast).tolist() == sampling.reference_sample(logits, st_ref).tolist()


def test_seeded_row_independent_of_batch():
    """A seeded row draws the same tokens alone and amid other (seeded or not) rows."""
    steps = 6
    logits = [random_logits(1, 2000, seed=100 + i, spread=1.0) for i in range(steps)]
    alone_st = st_of(1, temperature=1.0, top_p=0.95, seeds=[42])
    alone = [int(sampling.sample(l, alone_st)[0]) for l in logits]

    torch.manual_seed(0)
    batch_st = st_of(4, temperature=[0.7, 0.0, 1.0, 1.3], top_p=[1.0, 1.0, 0.95, 0.8], seeds=[None, None, 42, 7])
    in_batch = []
    for i, l in enumerate(logits):
        others = random_logits(4, 2000, seed=200 + i)
        others[2] = l[0]
        in_batch.append(int(sampling.sample(others, batch_st)[2]))
    assert in_batch == alone
    assert len(set(alone)) > 1  # it really sampled


@pytest.mark.parametrize("params", [dict(), dict(temperature=0.5), dict(top_k=3), dict(top_p=0.8), dict(min_p=0.2)],
                         ids=["plain", "temperature", "top_k", "top_p", "min_p"])
def test_sample_frequencies_follow_probs(params):
    """Pearson chi-square of 8000 draws over a 6-token vocabulary, fixed seed, loose bound."""
    n, logits = 8000, torch.tensor([[2.0, 1.5, 1.0, 0.3, 0.0, -1.0]])
    st = st_of(n, **params)
    probs = sampling.reference_probs(logits, st_of(1, **params))[0]
    torch.manual_seed(1234)
    tokens = sampling.sample(logits.expand(n, -1).contiguous(), st)
    counts = torch.bincount(tokens, minlength=6).double()
    support = probs > 0
    assert (counts[~support] == 0).all()
    expected = probs[support].double() * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (chi2, counts.tolist(), expected.tolist())  # df <= 5: p ~ 1e-4


# --------------------------------------------------------------------------- packed linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 32, 257])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_reference(dtype, rows, bias):
    from patchbay_kernels.linear import PackedLinear, reference_linear

    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 64, generator=g).to(dtype)
    lin = PackedLinear(w, b)
    assert lin.packed is not None, "oneDNN packing should be available on CPU"
    got = lin(x)
    want = reference_linear(x.float(), w.float(), None if b is None else b.float())
    tol = 1e-4 if dtype == torch.float32 else 0.15
    assert got.dtype == dtype and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol if dtype == torch.bfloat16 else 1e-5)
    assert torch.equal(lin(x.view(1, rows, 64)).view(rows, 96), got)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_bfloat16_without_bfloat16_instructions(monkeypatch, bias):
    """Without bfloat16 GEMM instructions (forced here, whatever this CPU has) a bfloat16 layer is
    packed as a float32 copy: bfloat16 out, the float32 product of the same values rounded once
    (what a bfloat16 GEMM computes), beyond the few rows linear_small takes."""
    from patchbay_kernels import linear

    monkeypatch.setattr(linear, "_bf16_gemm", lambda: False)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(40, 64, generator=g).to(torch.bfloat16)
    lin = linear.PackedLinear(w, b)
    assert lin.packed is not None and lin.packed.dtype == torch.float32
    got = lin(x)
    assert got.dtype == torch.bfloat16 and got.shape == (40, 96)
    want = (x.float() @ w.float().t() + (b.float() if bias else 0)).to(torch.bfloat16)
    # float32 sums in another order at most: a bfloat16 rounding step apart
    torch.testing.assert_close(got.float(), want.float(), atol=0.07, rtol=1 / 128)
    assert lin.bias is b  # linear_small keeps the bfloat16 bias


def test_packed_linear_small_false_keeps_rows_independent_of_the_batch():
    """A pooling model's layers (small=False) never take linear_small: a text's row is bitwise the same
    alone and among other requests' rows."""
    from patchbay_kernels.linear import PackedLinear

    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(384, 384, generator=g), torch.randn(384, generator=g)
    x = torch.randn(40, 384, generator=g)
    lin = PackedLinear(w, b, small=False)
    assert lin.small_rows == 0 and PackedLinear(w, b).small_rows > 0
    assert torch.equal(lin(x[:8]), lin(x)[:8])


def test_packed_linear_can_be_turned_off(monkeypatch):
    from patchbay_kernels.linear import PackedLinear

    monkeypatch.setenv("PATCHBAY_NO_PACKED_LINEAR", "1")
    lin = PackedLinear(torch.randn(8, 4))
    assert lin.packed is None and lin(torch.randn(2, 4)).shape == (2, 8)


@DTYPES
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("in_features", [64, 1408, 40, 7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_linear_small(dtype, rows, in_features, bias, threads):
    """The C++ few-rows kernel (every row count it takes, odd widths that end in a scalar tail,
    one and two threads) against float64 math rounded once."""
    g = torch.Generator().manual_seed(rows * 1000 + in_features)
    w = torch.randn(200, in_features, generator=g).to(dtype)
    b = torch.randn(200, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    out = torch.empty(rows, 200, dtype=dtype)
    kcpp.load().linear_small(x, w, b, out)
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == F32 else dict(atol=0, rtol=2 ** -7)
    torch.testing.assert_close(out.double(), want.to(dtype).double(), **tol)


def test_linear_small_rejects_bad_shapes():
    ops = kcpp.load()
    w = torch.randn(16, 8)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        ops.linear_small(torch.randn(9, 8), w, None, torch.empty(9, 16))
    with pytest.raises(RuntimeError, match="weight"):
        ops.linear_small(torch.randn(2, 4), w, None, torch.empty(2, 16))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_packed_linear_routes_few_rows_to_the_cpp_kernel(dtype, fused_path):
    """A decode-sized batch goes to ``linear_small``, a larger one to oneDNN; both agree."""
    from patchbay_kernels.linear import SMALL_ROWS, PackedLinear

    w, b = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
    lin = PackedLinear(w, b)
    x = torch.randn(SMALL_ROWS[dtype] + 1, 64).to(dtype)
    many = lin(x)
    few = lin(x[: SMALL_ROWS[dtype]])
    if fused_path is not None:
        assert fused_path == ["linear_small"]
    tol = 1e-5 if dtype == F32 else 2e-2
    torch.testing.assert_close(few, many[: SMALL_ROWS[dtype]], atol=tol, rtol=tol)


def test_bf16_stores_round_like_torch(fused_path):
    """The vectorised bfloat16 stores: float32 sums that fall on exact ties round to even,
    overflow gives infinity, infinities and NaN pass through, all exactly as torch rounds."""
    big = 3.3895313892515355e38  # the largest bfloat16
    pairs = [(1.0, 2**-8), (1.0, 3 * 2**-8), (-1.0, -(2**-8)), (big, big), (float("inf"), 1.0),
             (float("-inf"), 1.0), (float("nan"), 1.0), (2**-126, 2**-133)]
    pairs += [(float(a), float(b)) for a, b in torch.randn(24, 2)]
    x = torch.tensor([[a for a, _ in pairs]], dtype=BF16)
    res = torch.tensor([[b for _, b in pairs]], dtype=BF16)
    want = (x.float() + res.float()).to(BF16)
    summed = norm.add_rms_norm(x.clone(), res.clone(), torch.ones(32, dtype=BF16), 1e-6)[1]
    torch.testing.assert_close(summed, want, atol=0, rtol=0, equal_nan=True)
    assert want[0, 0] == 1.0 and want[0, 1] == 1.015625 and want[0, 3] == float("inf")
    assert ran(fused_path, "add_rms_norm")


@pytest.fixture
def gemv_helper():
    """linear_small's helper thread allowed (as the engine allows it with two or more threads), on one torch thread."""
    ops = kcpp.load()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    before = ops.set_gemv_helper(True)
    yield ops
    ops.set_gemv_helper(before)
    torch.set_num_threads(n)


@DTYPES
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("out_features", [8000, 1536, 300, 100])
def test_linear_small_with_helper_thread_is_bitwise_the_same(gemv_helper, dtype, rows, out_features):
    """Rows are never split between the two threads: the result equals the one-thread result bit for bit."""
    g = torch.Generator().manual_seed(out_features + rows)
    w = torch.randn(out_features, 512, generator=g).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype)
    x = torch.randn(rows, 512, generator=g).to(dtype)
    with_helper = [torch.empty(rows, out_features, dtype=dtype) for _ in range(20)]
    for out in with_helper:
        gemv_helper.linear_small(x, w, b, out)
    gemv_helper.set_gemv_helper(False)
    alone = torch.empty(rows, out_features, dtype=dtype)
    gemv_helper.linear_small(x, w, b, alone)
    assert all(torch.equal(out, alone) for out in with_helper)


def test_linear_small_helper_with_concurrent_callers(gemv_helper):
    """Callers from several threads at once (the helper serves one; the others run alone): all right."""
    import threading

    w = torch.randn(4096, 512)
    xs = [torch.randn(2, 512) for _ in range(4)]
    want = [x @ w.t() for x in xs]
    errors = []

    def call(i):
        out = torch.empty(2, 4096)
        for _ in range(50):
            gemv_helper.linear_small(xs[i], w, None, out)
            if not torch.allclose(out, want[i], atol=1e-4, rtol=1e-5):
                errors.append(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _helper_in_child(queue):
    import torch as t

    from patchbay_kernels import cpp as c

    w, x = t.ones(2048, 512), t.ones(1, 512)
    out = t.empty(1, 2048)
    c.load().linear_small(x, w, None, out)
    queue.put(float(out.sum()))


def test_linear_small_helper_survives_fork(gemv_helper):
    """A process forked after the helper started (as Granian forks its worker) has no helper
    thread: linear_small must neither hang nor go wrong there."""
    import multiprocessing

    out = torch.empty(1, 2048)
    gemv_helper.linear_small(torch.ones(1, 512), torch.ones(2048, 512), None, out)  # the helper runs now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_helper_in_child, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == 2048 * 512.0


def test_helper_thread_never_allowed_on_one_core(monkeypatch):
    """Pinned to one core (taskset), the helper would only take turns with the caller."""
    ops = kcpp.load()
    before = ops.set_gemv_helper(False)
    try:
        monkeypatch.setattr(kcpp.os, "sched_getaffinity", lambda pid: {0})
        kcpp.allow_helper_thread(True)
        assert ops.set_gemv_helper(False) is False
        monkeypatch.setattr(kcpp.os, "sched_getaffinity", lambda pid: {0, 1})
        kcpp.allow_helper_thread(True)
        assert ops.set_gemv_helper(False) is True
    finally:
        ops.set_gemv_helper(before)
