"""Speech to text without HTTP: the Whisper engine in-process at 1 and 2 torch threads, against transformers.

    .venv/bin/python benchmarks/whisper_engine_bench.py [--clips 8] [--seconds 20] [--concurrency 8]
        [--threads 1 2] [--repeats 3] [--profile] [--out whisper_engine_bench.json] [--smoke]

Where ``whisper_bench.py`` measures the whole server, this isolates the engine: the
benchmark Whisper (``benchmark_whisper_config``) is served in this process once per
``--threads`` value (``--cpu-threads T``: steps of more than two tokens run on T torch
threads), ``--clips`` clips are transcribed ``--concurrency`` at a time through
``ServedModel.transcribe`` (``language=en``, temperature 0: the path the endpoint takes,
minus HTTP and the upload), and transformers' ``generate`` runs the same clips in batches of
``--concurrency`` on T threads, as ``whisper_bench.py`` runs it. Rounds alternate over the
thread counts and the two sides, fresh clips per repeat; medians of audio seconds per wall
second are printed and written as JSON, with the engine's milliseconds per step and mean
decoder batch. ``--profile`` prints where the engine thread spent its time in the last round
(cProfile, top 25 by own time). ``--smoke``: the tiny test Whisper, 2 clips of 2 s, one repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from whisper_bench import RATE, clip, transformers_round  # noqa: E402


def engine_round(served, clips, concurrency: int, tag: str, profile: cProfile.Profile | None):
    """``(seconds, texts, engine steps, generated tokens)`` of transcribing ``clips``, C at a time."""
    from patchbay.audio import Waveform
    from patchbay.speech import SpeechJob, Transcript

    async def main():
        sem = asyncio.Semaphore(concurrency)

        async def one(i, samples):
            async with sem:
                async for event in served.transcribe(f"{tag}-{i}", Waveform(samples, RATE), SpeechJob(language="en")):
                    if isinstance(event, Transcript):
                        return event.text

        return await asyncio.gather(*(one(i, c) for i, c in enumerate(clips)))

    engine = served.engine
    if profile is not None:
        engine.call(profile.enable)
    s0, g0 = engine.steps, engine.generated_tokens
    t0 = time.perf_counter()
    texts = asyncio.run(main())
    seconds = time.perf_counter() - t0
    if profile is not None:
        engine.call(profile.disable)
        time.sleep(0.2)
    return seconds, texts, engine.steps - s0, engine.generated_tokens - g0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile the engine thread in the last round")
    ap.add_argument("--out", default="whisper_engine_bench.json")
    ap.add_argument("--smoke", action="store_true", help="smallest settings: tiny model, 2 clips of 2 s")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
    import torch
    import transformers
    from enginekit import build_serving
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    from patchbay_plugins.tinymodels import benchmark_whisper_config, build_tiny_whisper, cached_model

    from patchbay.serving import run_in_fresh_thread

    torch.set_num_threads(1)  # no OpenMP pool on the main thread (loading the models below runs here)
    transformers.logging.set_verbosity_error()
    if args.smoke:
        args.clips, args.seconds, args.repeats, model_args = 2, 2.0, 1, {}
    else:
        model_args = benchmark_whisper_config()
    model_dir = cached_model("bench-whisper", model_args, builder=build_tiny_whisper)
    hf = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = WhisperProcessor.from_pretrained(model_dir)
    config = GenerationConfig.from_pretrained(model_dir)

    def hf_round(clips, threads):  # in a thread that ends with it: its OpenMP pool goes too (see below)
        torch.set_num_threads(threads)  # transformers on as many threads as this engine's steps
        return transformers_round(hf, processor, config, clips, args.concurrency)

    def serve_round(t, clips, tag, prof):
        # One engine at a time, and transformers in a thread of its own: GNU libgomp keeps a worker pool per
        # thread that ran a parallel region, and once it manages more threads than there are cores it stops
        # spinning between regions (every small op of a step then waits for a wake-up). A second engine or
        # the main thread's pool next to the engine's made two-thread steps look slower than one thread's.
        s = build_serving(model_dir, max_model_len=None, cpu_threads=t)
        s.start()
        try:
            engine_round(s, [clip(999, 1.0)], 1, f"warm{tag}", None)
            return engine_round(s, clips, args.concurrency, tag, prof)
        finally:
            s.stop()

    rows = {t: {"engine": [], "transformers": [], "ms_per_step": [], "batch": [], "same": []} for t in args.threads}
    profile = cProfile.Profile() if args.profile else None
    for rep in range(args.repeats):
        clips = [clip(20_000 + 100 * rep + i, args.seconds) for i in range(args.clips)]
        audio = args.clips * args.seconds
        order = args.threads if rep % 2 == 0 else args.threads[::-1]
        for t in order:
            last = profile if rep == args.repeats - 1 and t == order[-1] else None
            sec, texts, steps, tokens = serve_round(t, clips, f"r{rep}t{t}", last)
            t_hf, texts_hf = run_in_fresh_thread(hf_round, clips, t)
            r = rows[t]
            r["engine"].append(audio / sec)
            r["transformers"].append(audio / t_hf)
            r["ms_per_step"].append(1000 * sec / max(steps, 1))
            r["batch"].append(tokens / max(steps, 1))
            r["same"].append(sum(a == b for a, b in zip(texts, texts_hf)) / len(clips))
            print(f"repeat {rep} threads {t}: engine {audio / sec:.2f} audio s/s ({1000 * sec / max(steps, 1):.1f} "
                  f"ms/step, batch {tokens / max(steps, 1):.2f})   transformers {audio / t_hf:.2f}", flush=True)
    results = {}
    for t, r in rows.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        results[str(t)] = {"engine_audio_s_per_s": med["engine"], "transformers_audio_s_per_s": med["transformers"],
                           "ratio": med["engine"] / med["transformers"], "ms_per_step": med["ms_per_step"],
                           "mean_decoder_batch": med["batch"], "same_text_fraction": med["same"]}
        print(f"threads {t}: engine {med['engine']:.2f} audio s/s   transformers (batch {args.concurrency}) "
              f"{med['transformers']:.2f}   x{results[str(t)]['ratio']:.2f}   {med['ms_per_step']:.1f} ms/step   "
              f"same text {med['same']:.0%}")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    out = {"model": str(model_dir), "clips": args.clips, "clip_seconds": args.seconds, "concurrency": args.concurrency,
           "repeats": args.repeats, "threads": results, "cpu_count": os.cpu_count()}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
