"""Micro-benchmarks of the patchbay_kernels ops at the engine's CPU shapes.

    .venv/bin/python benchmarks/kernels_micro.py [--threads 1,2] [--ops attention,small,sampling,decode]
        [--dtypes float32,bfloat16] [--baseline HEAD] [--reference] [--rounds 7] [--tune-malloc]

Shapes are those of the benchmark llama (hidden 512, 8 heads and 8 KV heads of 64,
intermediate 1408, vocab 8000): decode batches of 1/8/32 sequences with 128-300 tokens
of context in a paged cache of block size 16 with shuffled blocks, prefill chunks of
128-2048 tokens. Each number is the best of ``--rounds`` interleaved rounds, in
microseconds per call (thread CPU time with --threads 1, else wall time; the machine
is shared and noisy: compare columns of one run).
``--baseline REV`` times the kernels as of git revision REV side by side (``base``
column) and prints the speed-up; ``--reference`` adds the ``reference_*`` versions.
``--tune-malloc`` stops glibc from handing large freed blocks back to the OS (which
makes every large temporary page-fault in again; the default, as a server runs today).

``--ops decode`` (not in the default set) compares the two decode attention paths of this
checkout, the C++ kernel (``cpp``) and the torch gather + matmul path (``torch``, as with
``PATCHBAY_NO_CPP_KERNELS=1``): an 8-layer decode step of B sequences all at one context
length, plus ``write_kv``; it prints the median over ``--rounds`` interleaved rounds
(``--stat best`` for the best), and ``torch/cpp``:

    .venv/bin/python benchmarks/kernels_micro.py --ops decode --rounds 15
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from patchbay_kernels import activation, attention, cpp, norm, rotary, sampling

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"attention": attention, "norm": norm, "rotary": rotary, "activation": activation, "sampling": sampling}
HQ, HKV, D, HIDDEN, INTER, VOCAB, BLOCK = 8, 8, 64, 512, 1408, 8000, 16


def load_baseline(rev: str) -> dict:
    """The kernel modules as of git revision ``rev``, imported under private names."""
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="kernels-base-"))
    for name in MODULES:
        # the directory was kernels/ before it was renamed (it shadowed Hugging Face's `kernels`)
        for folder in ("patchbay_kernels", "kernels"):
            got = subprocess.run(["git", "show", f"{rev}:{folder}/{name}.py"], cwd=ROOT, capture_output=True, text=True)
            if got.returncode == 0:
                break
        got.check_returncode()
        src = got.stdout
        path = tmp / f"{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"_base_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        out[name] = mod
    return out


def best_of(fns: dict, rounds: int, per_round: float = 0.03, stat=min) -> dict:
    """Best (or ``stat`` of the) time per call (us) of each callable, timed in interleaved rounds.

    With one torch thread the clock is this thread's CPU time (immune to other
    processes taking the core); with more, wall time.
    """
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    reps = {}
    for name, fn in fns.items():
        fn()
        n = 1
        while True:
            t = clock()
            for _ in range(n):
                fn()
            if clock() - t > per_round:
                break
            n *= 2
        reps[name] = n
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = clock()
            for _ in range(reps[name]):
                fn()
            times[name].append((clock() - t) / reps[name] * 1e6)
    return {name: stat(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------- cases


def paged_step(mod, decodes=(), prefills=(), dtype=torch.float32, hkv=HKV, seed=0):
    """Random cache + metadata for one step (decodes first), built with ``mod``'s dataclasses."""
    gen = torch.Generator().manual_seed(seed)
    lens = [(n, 1) for n in decodes] + list(prefills)
    per_seq = [-(-ctx // BLOCK) for ctx, _ in lens]
    num_blocks = sum(per_seq) + 1
    pool = torch.randperm(num_blocks - 1, generator=gen).add_(1).tolist()  # block 0: padding
    kc = torch.randn(num_blocks, BLOCK, hkv, D, generator=gen).to(dtype)
    vc = torch.randn(num_blocks, BLOCK, hkv, D, generator=gen).to(dtype)
    slots = []
    for nb, (ctx, _) in zip(per_seq, lens):
        table = torch.tensor([pool.pop() for _ in range(nb)])
        slots.append((table.unsqueeze(1) * BLOCK + torch.arange(BLOCK)).flatten()[:ctx])
    T = sum(q for _, q in lens)
    q = torch.randn(T, HQ, D, generator=gen).to(dtype)
    k = torch.randn(T, hkv, D, generator=gen).to(dtype)
    v = torch.randn(T, hkv, D, generator=gen).to(dtype)
    meta = mod.AttentionMetadata(slot_mapping=torch.cat([s[c - n :] for s, (c, n) in zip(slots, lens)]),
                                 num_decodes=len(decodes))
    if decodes:
        L = max(decodes)
        meta.decode_slots = torch.zeros(len(decodes), L, dtype=torch.long)
        for i, s in enumerate(slots[: len(decodes)]):
            meta.decode_slots[i, : len(s)] = s
        if hasattr(meta, "decode_block_table"):  # as the engine fills it (absent from older revisions)
            meta.decode_block_table = meta.decode_slots[:, ::BLOCK] // BLOCK
        meta.decode_ctx_lens = torch.tensor(list(decodes))
    start = len(decodes)
    for s, (ctx, n) in zip(slots[len(decodes) :], prefills):
        meta.prefills.append(mod.PrefillChunk(start, start + n, ctx, s if n < ctx else None))
        start += n
    return q, k, v, kc, vc, meta


def attention_cases(dtype, hkv=HKV):
    rng = random.Random(0)
    for b in (1, 8, 32):
        yield f"decode B={b} hkv={hkv}", dict(decodes=[rng.randint(128, 300) for _ in range(b)], hkv=hkv)
    for n in (128, 512, 2048):
        yield f"prefill {n} hkv={hkv}", dict(prefills=[(n, n)], hkv=hkv)
    yield f"prefill 512 after 1024 cached hkv={hkv}", dict(prefills=[(1536, 512)], hkv=hkv)
    yield f"mixed 8 decodes + 128 prefill hkv={hkv}", dict(decodes=[rng.randint(128, 300) for _ in range(8)],
                                                          prefills=[(128, 128)], hkv=hkv)


def layer_step(mod, spec, dtype, layers=8):
    """One model step's attention calls: ``layers`` caches, fresh metadata per step."""
    q, k, v, kc, vc, meta = paged_step(mod, dtype=dtype, **spec)
    caches = [(kc.clone(), vc.clone()) for _ in range(layers)]
    fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta) if f.init}

    def step():
        m = mod.AttentionMetadata(**fields)
        for kc, vc in caches:
            mod.paged_attention(q, k, v, kc, vc, m, D**-0.5)

    return step


def bench_attention(impls, dtype, rounds):
    rng = random.Random(1)
    for b in (1, 8, 32):
        spec = dict(decodes=[rng.randint(128, 300) for _ in range(b)])
        fns = {name: layer_step(mods["attention"], spec, dtype) for name, mods in impls.items() if name != "ref"}
        yield f"decode step of 8 layers B={b}", best_of(fns, rounds)
    for hkv in (HKV, 2):
        for label, spec in attention_cases(dtype, hkv):
            fns = {}
            for name, mods in impls.items():
                args = paged_step(mods["attention"], dtype=dtype, **spec)
                fn = mods["attention"].reference_paged_attention if name == "ref" else mods["attention"].paged_attention
                fns[name] = lambda fn=fn, args=args: fn(*args, D**-0.5)
            if "ref" in fns and "2048" in label:
                del fns["ref"]  # too slow to be interesting
            yield label, best_of(fns, rounds)


def bench_small_ops(impls, dtype, rounds):
    gen = torch.Generator().manual_seed(0)
    for T in (1, 32, 2048):
        x = torch.randn(T, HIDDEN, generator=gen).to(dtype)
        res = torch.randn(T, HIDDEN, generator=gen).to(dtype)
        w = torch.randn(HIDDEN, generator=gen).to(dtype)
        gu = torch.randn(T, 2 * INTER, generator=gen).to(dtype)
        qkv = torch.randn(T, (HQ + 2 * HKV) * D, generator=gen).to(dtype)
        q = qkv[:, : HQ * D].view(T, HQ, D)
        k = qkv[:, HQ * D : (HQ + HKV) * D].view(T, HKV, D)
        cos, sin = rotary.cos_sin_cache(1.0 / 10000 ** (torch.arange(0, D, 2).float() / D), 4096)
        pos = torch.randint(0, 4096, (T,), generator=gen)
        c, s = cos[pos], sin[pos]
        cases = {
            "rms_norm": lambda m, ref: (m["norm"].reference_rms_norm if ref else m["norm"].rms_norm)(x, w, 1e-5),
            "add_rms_norm": lambda m, ref: (m["norm"].reference_add_rms_norm if ref else m["norm"].add_rms_norm)(
                x, res, w, 1e-5),
            "silu_and_mul": lambda m, ref: (
                m["activation"].reference_silu_and_mul if ref else m["activation"].silu_and_mul)(gu),
            "apply_rotary": lambda m, ref: (
                m["rotary"].reference_apply_rotary if ref else m["rotary"].apply_rotary)(q, k, c, s),
        }
        for op, call in cases.items():
            fns = {name: (lambda call=call, m=m, name=name: call(m, name == "ref")) for name, m in impls.items()}
            yield f"{op} T={T}", best_of(fns, rounds)


def zipf_logits(n, vocab, seed):
    """Text-like logits: probabilities ~ rank^-1.1, ranks shuffled per row."""
    gen = torch.Generator().manual_seed(seed)
    base = -1.1 * torch.arange(1, vocab + 1, dtype=torch.float32).log()
    return torch.stack([base[torch.randperm(vocab, generator=gen)] for _ in range(n)])


def sampling_tensors(smod, cfg, n):
    """``smod.SamplingTensors`` for ``n`` rows with the scalar parameters of ``cfg``."""
    def col(key, dtype):
        return None if key not in cfg else torch.full((n,), cfg[key], dtype=dtype)

    st = smod.SamplingTensors(temperature=col("temperature", torch.float32), top_k=col("top_k", torch.long),
                              top_p=col("top_p", torch.float32), min_p=col("min_p", torch.float32),
                              all_greedy=cfg["temperature"] == 0)
    if cfg.get("seeded"):
        st.generators = {i: torch.Generator().manual_seed(i) for i in range(n)}
    return st


def bench_sampling(impls, dtype, rounds):
    if dtype != torch.float32:
        return  # logits are float32 whatever the model dtype
    configs = {
        "greedy": dict(temperature=0.0),
        "temperature": dict(temperature=0.8),
        "top_k=50": dict(temperature=0.8, top_k=50),
        "top_p=0.9": dict(temperature=0.8, top_p=0.9),
        "top_k=50+top_p=0.9+min_p=0.05": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
        "top_p=0.9 seeded": dict(temperature=0.8, top_p=0.9, seeded=True),
    }
    for vocab in (VOCAB, 32000):
        for b in (1, 8, 32):
            logits = zipf_logits(b, vocab, seed=b)
            for label, cfg in configs.items():
                if vocab != VOCAB and label not in ("top_p=0.9", "temperature"):
                    continue
                fns = {}
                for name, mods in impls.items():
                    smod = mods["sampling"]
                    fn = smod.sample
                    if name == "ref":  # reference_sample needs a generator on every random row
                        if not cfg.get("seeded") and cfg["temperature"] > 0:
                            continue
                        fn = smod.reference_sample
                    fns[name] = lambda fn=fn, st=sampling_tensors(smod, cfg, b): fn(logits, st)
                yield f"sample V={vocab} B={b} {label}", best_of(fns, rounds)


def bench_decode_paths(impls, dtype, rounds, stat=statistics.median):
    """This checkout's decode attention, C++ kernel against the torch path, at fixed contexts."""
    mod = MODULES["attention"]

    def path(fn, cpp):
        def run():
            if cpp:
                os.environ.pop("PATCHBAY_NO_CPP_KERNELS", None)
            else:
                os.environ["PATCHBAY_NO_CPP_KERNELS"] = "1"
            fn()

        return run

    for b in (1, 8, 32):
        for ctx in (200, 300):
            step = layer_step(mod, dict(decodes=[ctx] * b), dtype)
            yield f"decode step of 8 layers B={b} ctx={ctx}", best_of(
                {"cpp": path(step, True), "torch": path(step, False)}, rounds, stat=stat)
    for t in (1, 32):
        q, k, v, kc, vc, meta = paged_step(mod, decodes=[50] * t, dtype=dtype)
        fn = lambda: mod.write_kv(k, v, kc, vc, meta.slot_mapping)  # noqa: E731
        yield f"write_kv T={t}", best_of({"cpp": path(fn, True), "torch": path(fn, False)}, rounds, stat=stat)
    os.environ.pop("PATCHBAY_NO_CPP_KERNELS", None)


BENCHES = {"attention": bench_attention, "small": bench_small_ops, "sampling": bench_sampling,
           "decode": bench_decode_paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ops", default="attention,small,sampling", help=f"comma-separated subset of {list(BENCHES)}")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--baseline", metavar="REV", help="also time the kernels of this git revision")
    ap.add_argument("--reference", action="store_true", help="also time the reference_* versions")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--stat", choices=["median", "best"], default="median", help="of --ops decode's rounds")
    ap.add_argument("--tune-malloc", action="store_true", help="glibc: no mmap below 32 MiB, no trimming")
    args = ap.parse_args()
    if args.tune_malloc:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD

    impls = {"fast": MODULES}
    if args.baseline:
        impls["base"] = load_baseline(args.baseline)
    if args.reference:
        impls["ref"] = MODULES
    names = list(impls)
    print(f"torch {torch.__version__}, columns: best us/call of {names}" + (", base/fast" if args.baseline else ""))
    if "decode" in args.ops.split(","):
        err = cpp.error()  # builds the C++ kernels now, not inside a timing
        print(f"--ops decode: {args.stat} us/call of ['cpp', 'torch'], torch/cpp"
              + (f"; NO C++ KERNELS: {err}" if err else ""))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            print(f"\n== threads {threads}, {str(dtype).removeprefix('torch.')}")
            for op in args.ops.split(","):
                if op == "decode":
                    stat = statistics.median if args.stat == "median" else min
                    for label, res in bench_decode_paths(impls, dtype, args.rounds, stat):
                        print(f"{label:<44} {res['cpp']:>10.0f} {res['torch']:>10.0f}  {res['torch'] / res['cpp']:6.2f}x",
                              flush=True)
                    continue
                for label, res in BENCHES[op](impls, dtype, args.rounds):
                    cols = " ".join(f"{res[n]:>10.0f}" if n in res else f"{'-':>10}" for n in names)
                    ratio = f"  {res['base'] / res['fast']:6.2f}x" if "base" in res else ""
                    print(f"{label:<44} {cols}{ratio}", flush=True)


if __name__ == "__main__":
    main()
