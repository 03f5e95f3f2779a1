"""A wave of prompts with one shared prefix: the scheduler's in-flight prefix deferral on and off.

Eight prompts of the same ``--prefix`` tokens + ``--fresh`` tokens of their own reach the engine
together (held behind a gate on the engine thread until all are in its inbox), ``--output`` tokens
each, on the benchmark llama (float32, two threads, in-process: no HTTP). "on" is the scheduler as
shipped; "off" replaces ``Scheduler._awaits_shared_prefix`` with one that never holds a prompt back
(the scheduler before the change). Rounds alternate on / off with fresh prompts (a new prefix each
round); reported: median TTFT, the last TTFT, wall time of the wave, and the prompt tokens the engine
computed (deterministic; from the prefix-cache hit counters), medians over ``--repeats`` rounds.

    .venv/bin/python benchmarks/prefix_wave.py --repeats 5 --out bench-results/prefix_wave.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any


def wave(serving: Any, prompts: list[list[int]], output: int, tag: str) -> dict[str, float]:
    from patchbay.engine.params import SamplingParams

    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    engine = serving.engine
    gate = threading.Event()
    hits_before = engine.scheduler.blocks.hit_tokens

    async def one(i: int, prompt: list[int], start: float) -> float:
        first = None
        async for _ in engine.generate(f"{tag}-{i}", prompt, params):
            first = first or time.perf_counter() - start
        return first

    async def main() -> list[float]:
        engine.call(lambda: gate.wait(30))
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i, p, start)) for i, p in enumerate(prompts)]
        await asyncio.sleep(0.2)  # every request is in the inbox, behind the gate
        start_gate = time.perf_counter()
        gate.set()
        ttfts = await asyncio.gather(*tasks)
        return [t - (start_gate - start) for t in ttfts] + [time.perf_counter() - start_gate]

    *ttfts, wall = asyncio.run(main())
    computed = sum(len(p) for p in prompts) - (engine.scheduler.blocks.hit_tokens - hits_before)
    return {"ttft p50 ms": statistics.median(ttfts) * 1e3, "ttft max ms": max(ttfts) * 1e3, "wall s": wall,
            "prompt tokens computed": computed}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
    from enginekit import build_serving
    from patchbay.engine.scheduler import Scheduler
    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=1000)
    ap.add_argument("--fresh", type=int, default=50)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = cached_model("bench-llama-float32", benchmark_model_config("float32"))
    serving = build_serving(model, max_model_len=2048, cpu_threads=2)
    serving.start()
    shipped = Scheduler._awaits_shared_prefix
    results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    rng = random.Random(0)

    def prompts() -> list[list[int]]:
        prefix = [rng.randrange(16, 8000) for _ in range(args.prefix)]
        return [prefix + [rng.randrange(16, 8000) for _ in range(args.fresh)] for _ in range(args.prompts)]

    try:
        wave(serving, prompts(), 4, "warm")
        for r in range(args.repeats):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                Scheduler._awaits_shared_prefix = shipped if mode == "on" else (lambda self, seq, prefilling: False)
                results[mode].append(wave(serving, prompts(), args.output, f"{mode}{r}"))
                print(f"round {r} {mode}: {results[mode][-1]}", file=sys.stderr, flush=True)
    finally:
        Scheduler._awaits_shared_prefix = shipped
        serving.stop()
    summary = {mode: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for mode, runs in results.items()}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
