"""The transformers fallback against the native llama family and transformers' ``generate``, in one run.

On the benchmark llama (``core_bench``'s ~34M-parameter model), per repeat:

1. ``serve`` with ``--model-impl native`` (the llama family), driven by ``patchbay-bench`` at each
   concurrency level (128 random prompt tokens -> 128 output tokens, ``ignore_eos``, fresh prompts per
   level), and the same with ``--model-impl transformers`` (the fallback family on the same weights),
   alternating which goes first from one repeat to the next;
2. transformers' greedy ``generate`` on the same weights, a batch as large as each concurrency level.

Reports medians over ``--repeats`` and the ratios the issue names (fallback / native, fallback / generate),
and writes everything as JSON. ``--also ARCH ...`` adds models of other architectures of the same sizes
(served by the fallback only: no native family runs them), to see which architecture the fallback serves
furthest behind the llama family's native speed — where a native family would pay off most.

    .venv/bin/python benchmarks/fallback_bench.py --repeats 3 --out bench-results/fallback.json \
        --also Gemma2ForCausalLM Phi3ForCausalLM Qwen3MoeForCausalLM
    .venv/bin/python benchmarks/fallback_bench.py --repeats 1 --num-prompts 8 --concurrency 1 8 --output-len 16 \
        --out bench-results/fallback-smoke.json  # the smallest run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from patchbay_bench.core_bench import generate_baseline, model_dir
from patchbay_bench.serveproc import start_serve, stop_serve

BIN = Path(sys.executable).parent
IMPLS = ("native", "transformers")
#: --also models: realistic option values where the tiny test models' ones would distort the timing (a window
#: shorter than the prompts); the window stays below the context so that the windowed paths run
BENCH_OVERRIDES = {
    "Gemma2ForCausalLM": dict(sliding_window=2048, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                              query_pre_attn_scalar=64),
    "Gemma3ForCausalLM": dict(sliding_window=2048, query_pre_attn_scalar=64),
    "Phi3ForCausalLM": dict(sliding_window=2048),
    "MixtralForCausalLM": dict(sliding_window=2048),
}


def other_model(arch: str, dtype: str) -> Path:
    """The benchmark llama's sizes as ``arch`` (built once, cached)."""
    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model

    config = {**benchmark_model_config(dtype), "arch": arch, **BENCH_OVERRIDES.get(arch, {})}
    return cached_model(f"bench-{arch.lower()}-{dtype}", config)


def serve_levels(model: Path, impl: str, args, seed: int, tag: str = "") -> list[dict]:
    """``patchbay-bench`` levels against ``serve --model-impl impl``."""
    port = 8750 + seed % 50 + (0 if impl == "native" else 50) + (100 if tag else 0)
    stem = Path(f"{Path(args.out).with_suffix('')}{tag}")
    log = Path(f"{stem}.{impl}.serve{seed}.log")
    proc = start_serve(model, port, ["--cpu-threads", str(args.threads), "--dtype", args.dtype, "--served-model-name",
                                     "bench", "--max-model-len", "1024", "--log-level", "warning", "--model-impl",
                                     impl], log, threads=args.threads)
    try:
        out = Path(f"{stem}.{impl}.levels{seed}.json")
        subprocess.run(
            [str(BIN / "patchbay-bench"), "--base-url", f"http://127.0.0.1:{port}", "--num-prompts",
             str(args.num_prompts), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
             "--concurrency", *map(str, args.concurrency), "--seed", str(seed * 1000), "--result-json", str(out)],
            check=True,
        )
        return json.loads(out.read_text())["levels"]
    finally:
        stop_serve(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--also", nargs="*", default=[], metavar="ARCH",
                   help="fallback-only architectures to serve at the same sizes, e.g. Gemma2ForCausalLM")
    p.add_argument("--out", default="bench-results/fallback.json")
    args = p.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.dtype)
    others = {arch: other_model(arch, args.dtype) for arch in args.also}
    runs = []
    for r in range(args.repeats):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]  # alternate who goes first: the machine's load drifts
        run: dict = {impl: serve_levels(model, impl, args, seed=r + 1) for impl in order}
        run["generate"] = {c: generate_baseline(model, args.dtype, args.threads, c, seed=r,
                                                new_tokens=args.output_len, prompt_len=args.input_len)
                           for c in args.concurrency}
        for arch, path in others.items():
            run[arch] = serve_levels(path, "transformers", args, seed=r + 1, tag=f".{arch}")
        runs.append(run)
        print(f"run {r}: " + "; ".join(
            f"c{c}: native {lv_n['output_throughput']:.1f}, transformers {lv_t['output_throughput']:.1f}, "
            f"generate {run['generate'][c]:.1f}"
            for c, lv_n, lv_t in zip(args.concurrency, run["native"], run["transformers"])), file=sys.stderr)
    levels = []
    for i, conc in enumerate(args.concurrency):
        med = {impl: statistics.median(run[impl][i]["output_throughput"] for run in runs) for impl in IMPLS}
        med["generate"] = statistics.median(run["generate"][conc] for run in runs)
        levels.append({
            "concurrency": conc,
            "output_throughput": med,
            "fallback_vs_native": med["transformers"] / med["native"],
            "fallback_vs_generate": med["transformers"] / med["generate"],
            "tpot_median_ms": {impl: statistics.median(run[impl][i]["tpot_ms"]["median"] for run in runs)
                               for impl in IMPLS},
            "all_runs": {impl: [run[impl][i]["output_throughput"] for run in runs] for impl in IMPLS}
            | {"generate": [run["generate"][conc] for run in runs]},
            "also": {},
        })
        for arch in others:
            tput = statistics.median(run[arch][i]["output_throughput"] for run in runs)
            levels[-1]["also"][arch] = {"output_throughput": tput, "vs_llama_native": tput / med["native"]}
    summary = {"dtype": args.dtype, "repeats": args.repeats, "input_len": args.input_len,
               "output_len": args.output_len, "levels": levels}
    Path(args.out).write_text(json.dumps({"median": summary, "runs": runs}, indent=2))
    print(table(summary))
    print(f"wrote {args.out}", file=sys.stderr)


def table(summary: dict) -> str:
    """The medians as the markdown table of docs/benchmarks.md (output tok/s; the targets' ratios)."""
    also = list(summary["levels"][0]["also"]) if summary["levels"] else []
    head = ["concurrency", "native llama", "transformers fallback", "generate", "fallback / native",
            "fallback / generate", *(f"{arch} (fallback)" for arch in also)]
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---:"] * len(head)) + " |"]
    for lv in summary["levels"]:
        tput = lv["output_throughput"]
        cells = [str(lv["concurrency"]), f"{tput['native']:.1f}", f"{tput['transformers']:.1f}",
                 f"{tput['generate']:.1f}", f"{lv['fallback_vs_native']:.0%}", f"{lv['fallback_vs_generate']:.2f}x",
                 *(f"{lv['also'][arch]['output_throughput']:.1f} ({lv['also'][arch]['vs_llama_native']:.0%})"
                   for arch in also)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
