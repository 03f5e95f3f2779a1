"""The core benchmark of docs/benchmarks.md, in one run.

1. Builds (or reuses) the ~34M-parameter random Llama (hidden 512, 8 layers,
   8 heads, intermediate 1408, vocab 8000) in the requested dtype.
2. Starts ``serve`` on it with both cores (``--cpu-threads 2``) and runs
   ``patchbay-bench``: 64 requests of 128 random prompt tokens -> 128 output
   tokens (``ignore_eos``) at each concurrency level, fresh prompts per level.
3. Stops the server and measures plain transformers ``generate`` on the same
   weights in the same process run: one request, and a padded batch of 16.

Repeats the whole thing ``--repeats`` times and reports medians.

    .venv/bin/python benchmarks/core_bench.py --dtype float32 --repeats 3 --out bench-results/core-fp32.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from patchbay_bench.serveproc import start_serve, stop_serve

BIN = Path(sys.executable).parent


def model_dir(dtype: str) -> Path:
    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model

    return cached_model(f"bench-llama-{dtype}", benchmark_model_config(dtype))


def start_server(model: Path, port: int, threads: int, dtype: str, log: Path) -> subprocess.Popen:
    return start_serve(model, port, ["--cpu-threads", str(threads), "--dtype", dtype, "--served-model-name", "bench",
                                     "--max-model-len", "1024", "--log-level", "warning"], log, threads=threads)


def run_server_levels(model: Path, args, seed: int) -> list[dict]:
    port = 8700 + seed % 100
    log = Path(args.out).with_suffix(f".serve{seed}.log")
    proc = start_server(model, port, args.threads, args.dtype, log)
    try:
        out = Path(args.out).with_suffix(f".levels{seed}.json")
        subprocess.run(
            [str(BIN / "patchbay-bench"), "--base-url", f"http://127.0.0.1:{port}", "--num-prompts",
             str(args.num_prompts), "--input-len", "128", "--output-len", "128", "--concurrency",
             *map(str, args.concurrency), "--seed", str(seed * 1000), "--result-json", str(out)],
            check=True,
        )
        return json.loads(out.read_text())["levels"]
    finally:
        stop_serve(proc)


def generate_baseline(model: Path, dtype: str, threads: int, batch: int, seed: int, new_tokens: int = 128,
                      prompt_len: int = 128) -> float:
    """Output tokens/s of transformers' generate, greedy, ``new_tokens`` after ``prompt_len`` prompt tokens,
    after a warm-up."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(16, 8000, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.inference_mode():
        m.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        ids = torch.randint(16, 8000, (batch, prompt_len), generator=g)  # fresh prompts for the measured run
        start = time.perf_counter()
        out = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt_len + new_tokens
    return batch * new_tokens / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--out", default="bench-results/core.json")
    args = p.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.dtype)
    runs = []
    for r in range(args.repeats):
        levels = run_server_levels(model, args, seed=r + 1)
        gen1 = generate_baseline(model, args.dtype, args.threads, 1, seed=r)
        gen16 = generate_baseline(model, args.dtype, args.threads, 16, seed=r)
        runs.append({"levels": levels, "generate_bs1": gen1, "generate_bs16": gen16})
        print(f"run {r}: " + ", ".join(f"c{lv['concurrency']}={lv['output_throughput']:.1f}" for lv in levels)
              + f", generate bs1={gen1:.1f}, bs16={gen16:.1f}", file=sys.stderr)
    med = {
        "dtype": args.dtype,
        "repeats": args.repeats,
        "generate_bs1": statistics.median(r["generate_bs1"] for r in runs),
        "generate_bs16": statistics.median(r["generate_bs16"] for r in runs),
        "levels": [],
    }
    for i, conc in enumerate(args.concurrency):
        lv = [r["levels"][i] for r in runs]
        med["levels"].append({
            "concurrency": conc,
            "output_throughput": statistics.median(x["output_throughput"] for x in lv),
            "ttft_median_ms": statistics.median(x["ttft_ms"]["median"] for x in lv),
            "tpot_median_ms": statistics.median(x["tpot_ms"]["median"] for x in lv),
            "itl_median_ms": statistics.median(x["itl_ms"]["median"] for x in lv),
            "itl_p99_ms": statistics.median(x["itl_ms"]["p99"] for x in lv),
            "all_runs": [x["output_throughput"] for x in lv],
        })
    Path(args.out).write_text(json.dumps({"median": med, "runs": runs}, indent=2))
    print(json.dumps(med, indent=2))


if __name__ == "__main__":
    main()
