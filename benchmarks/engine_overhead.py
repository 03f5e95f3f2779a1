"""Is the HTTP side the bottleneck? Engine alone versus the same work through `serve`.

"engine": requests submitted in-process to ``Engine.generate`` from an asyncio
loop (no HTTP, no JSON, no SSE); "http": the same number of requests of the
same shape through a real ``serve`` process and ``patchbay-bench``. Fresh
random prompts each time, alternating, medians of ``--repeats``.

    .venv/bin/python benchmarks/engine_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from patchbay_bench.serveproc import start_serve, stop_serve

BIN = Path(sys.executable).parent


def engine_run(serving, conc: int, n: int, seed: int) -> float:
    from patchbay.engine.params import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(16, 8000) for _ in range(128)] for _ in range(n)]
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True, detokenize=True)

    async def main() -> int:
        sem = asyncio.Semaphore(conc)
        total = 0

        async def one(i: int, p: list[int]) -> None:
            nonlocal total
            async with sem:
                async for out in serving.engine.generate(f"s{seed}-{i}", p, params):
                    total += len(out.token_ids)

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return total

    t = time.perf_counter()
    tokens = asyncio.run(main())
    return tokens / (time.perf_counter() - t)


def http_run(port: int, conc: int, n: int, seed: int, out: Path) -> float:
    subprocess.run([str(BIN / "patchbay-bench"), "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", str(n),
                    "--concurrency", str(conc), "--seed", str(seed), "--warmup", "0", "--result-json", str(out)],
                   check=True, capture_output=True)
    return json.loads(out.read_text())["levels"][0]["output_throughput"]


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
    from enginekit import build_serving
    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--out", default="bench-results/overhead.json")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = cached_model("bench-llama-float32", benchmark_model_config("float32"))
    results: dict[str, dict[int, list[float]]] = {"engine": {}, "http": {}}
    for r in range(args.repeats):
        serving = build_serving(model, max_model_len=1024, cpu_threads=2)
        serving.start()
        engine_run(serving, 2, 2, seed=999)  # warm-up
        for conc in args.concurrency:
            results["engine"].setdefault(conc, []).append(engine_run(serving, conc, args.num_prompts, 1000 * r + conc))
        serving.stop()
        del serving
        port = 8766
        proc = start_serve(model, port, ["--cpu-threads", "2", "--max-model-len", "1024", "--log-level", "warning"],
                           out.with_suffix(".serve.log"), threads=2)
        try:
            http_run(port, 2, 2, 999, out.with_suffix(".warm.json"))
            for conc in args.concurrency:
                results["http"].setdefault(conc, []).append(
                    http_run(port, conc, args.num_prompts, 1000 * r + conc + 500, out.with_suffix(f".{conc}.json")))
        finally:
            stop_serve(proc)
        print(f"run {r}: " + json.dumps({k: {c: round(v[-1], 1) for c, v in d.items()} for k, d in results.items()}),
              file=sys.stderr)
    summary = {k: {c: statistics.median(v) for c, v in d.items()} for k, d in results.items()}
    out.write_text(json.dumps({"median": summary, "runs": results}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
