"""Speech to text: audio seconds transcribed per wall second, patchbay's server against transformers.

    .venv/bin/python benchmarks/whisper_bench.py [--clips 16] [--seconds 20] [--concurrency 1 8]
        [--repeats 1] [--out whisper_bench.json] [--smoke]

Builds (once, cached) the benchmark Whisper — whisper-tiny's shape (d_model 384,
4 + 4 layers, 6 heads) with a 4000-token text vocabulary, random weights, ~22M
parameters — and starts a real ``serve`` on it (both cores). For each
concurrency C, ``--clips`` fresh clips of ``--seconds`` seconds (new audio at
every level) are sent by C clients at once to ``POST /v1/audio/transcriptions``
(``language=en``, temperature 0, WAV); against it, in this process and on the
same clips, transformers' ``WhisperForConditionalGeneration.generate`` on
batches of C clips (features from ``WhisperProcessor``, two torch threads; one
decoding per window, ``force_unique_generate_call``, as the server does).
Rounds alternate server / transformers ``--repeats`` times; the medians of audio
seconds per wall second and their ratio are printed (and a Markdown table at the
end) and written as JSON, with the server's mean decoder batch over each level
(generated tokens per engine step, from ``/metrics``: above 1 only when the
scheduler batches decoders of different requests).
``--smoke`` runs the smallest settings (the tiny test Whisper, 2 clips of 2 s)
to prove the script works.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from patchbay_bench.serveproc import start_serve, stop_serve  # noqa: E402

RATE = 16000


def clip(seed: int, seconds: float) -> np.ndarray:
    """Gliding tones over noise, different for every seed (fresh audio per level: nothing is cached)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    out = 0.03 * rng.standard_normal(t.shape[0])
    for _ in range(3):
        f0, f1 = rng.uniform(120, 3000, 2)
        out += rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    return out.astype(np.float32)


def wav(samples: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_counts(base: str) -> tuple[float, float]:
    """``(generated tokens, engine steps)`` so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text)
              for s in f.samples}
    return values["vllm:generation_tokens_total"], values["patchbay:engine_steps_total"]


def server_round(url: str, clips: list[np.ndarray], concurrency: int) -> tuple[float, list[str]]:
    files = [wav(c) for c in clips]

    def one(data: bytes) -> str:
        with httpx.Client(timeout=600) as http:
            r = http.post(url, files={"file": ("a.wav", data, "audio/wav")},
                          data={"model": "whisper", "language": "en", "temperature": "0"})
            r.raise_for_status()
            return r.json()["text"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        texts = list(pool.map(one, files))
    return time.perf_counter() - t0, texts


def transformers_round(model, processor, config, clips: list[np.ndarray], batch: int) -> tuple[float, list[str]]:
    import torch

    texts: list[str] = []
    t0 = time.perf_counter()
    for i in range(0, len(clips), batch):
        part = clips[i:i + batch]
        feats = processor(part, sampling_rate=RATE, return_tensors="pt").input_features
        with torch.no_grad():
            out = model.generate(feats, generation_config=copy.deepcopy(config), language="en", task="transcribe",
                                 force_unique_generate_call=True, return_dict_in_generate=True)
        texts += processor.batch_decode(out.sequences, skip_special_tokens=True)
    return time.perf_counter() - t0, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="whisper_bench.json")
    ap.add_argument("--smoke", action="store_true", help="smallest settings: tiny model, 2 clips of 2 s")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    from patchbay_plugins.tinymodels import benchmark_whisper_config, build_tiny_whisper, cached_model

    transformers.logging.set_verbosity_error()
    if args.smoke:
        args.clips, args.seconds, model_args = 2, 2.0, {}
    else:
        model_args = benchmark_whisper_config()
    model_dir = cached_model("bench-whisper", model_args, builder=build_tiny_whisper)
    torch.set_num_threads(2)
    hf = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = WhisperProcessor.from_pretrained(model_dir)
    config = GenerationConfig.from_pretrained(model_dir)
    params = sum(p.numel() for p in hf.parameters())

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="whisper-bench-")) / "serve.log"
    proc = start_serve(model_dir, port, ["--served-model-name", "whisper"], log)
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/audio/transcriptions"
    results = {}
    try:
        server_round(url, [clip(999, 1.0)], 1)  # warm-up (kernels built, first encoder pass)
        for level, c in enumerate(args.concurrency):
            ours, theirs, agree = [], [], []
            tokens0, steps0 = engine_counts(base)
            for rep in range(args.repeats):
                clips = [clip(10_000 * (level + 1) + 100 * rep + i, args.seconds) for i in range(args.clips)]
                audio = args.clips * args.seconds
                t_ours, texts_ours = server_round(url, clips, c)
                t_hf, texts_hf = transformers_round(hf, processor, config, clips, c)
                ours.append(audio / t_ours)
                theirs.append(audio / t_hf)
                agree.append(sum(a == b for a, b in zip(texts_ours, texts_hf)) / len(clips))
            tokens1, steps1 = engine_counts(base)
            row = {"patchbay_audio_s_per_s": statistics.median(ours),
                   "transformers_audio_s_per_s": statistics.median(theirs),
                   "same_text_fraction": statistics.median(agree),
                   "mean_decoder_batch": (tokens1 - tokens0) / max(steps1 - steps0, 1)}
            row["ratio"] = row["patchbay_audio_s_per_s"] / row["transformers_audio_s_per_s"]
            results[str(c)] = row
            print(f"concurrency {c:3d}: patchbay {row['patchbay_audio_s_per_s']:8.2f} audio s/s   transformers "
                  f"(batch {c}) {row['transformers_audio_s_per_s']:8.2f} audio s/s   x{row['ratio']:.2f}   "
                  f"same text {row['same_text_fraction']:.0%}   mean decoder batch {row['mean_decoder_batch']:.2f}",
                  flush=True)
    finally:
        stop_serve(proc)
    out = {"model": str(model_dir), "parameters": params, "clips": args.clips, "clip_seconds": args.seconds,
           "repeats": args.repeats, "levels": results, "cpu_count": os.cpu_count()}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nwrote {args.out}")


def table(levels: dict[str, dict[str, float]]) -> str:
    """The rows of docs/benchmarks.md, one column per concurrency."""
    cols = list(levels)
    rows = [("patchbay `serve` (audio s/s)", "patchbay_audio_s_per_s", "{:.2f}"),
            ("transformers `generate`, batch C (audio s/s)", "transformers_audio_s_per_s", "{:.2f}"),
            ("ratio", "ratio", "x{:.2f}"), ("mean decoder batch (tokens per engine step)", "mean_decoder_batch", "{:.2f}"),
            ("same text", "same_text_fraction", "{:.0%}")]
    lines = ["| | " + " | ".join(f"concurrency {c}" for c in cols) + " |", "| --- |" + " --- |" * len(cols)]
    lines += ["| " + label + " | " + " | ".join(fmt.format(levels[c][key]) for c in cols) + " |"
              for label, key, fmt in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
