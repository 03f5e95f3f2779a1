"""Scale-out on Ray Serve: 1 replica against 2 (and plain ``serve``), at the same concurrency, in one run.

For each setting it starts the server on the same model, measures the start
time (command start to the first answered request), each serving process's
resident memory after loading and after the load test, and output token
throughput with ``patchbay-bench``'s load (fresh random prompts per run,
fixed output length, streamed). The baseline is ``serve`` itself: one
process, no Ray, same threads per model copy. Runs in ``.venv-ray`` (it needs
``patchbay-ray``):

    make ray ARGS=--help   # creates .venv-ray once
    .venv-ray/bin/python benchmarks/ray_scale.py --replicas 1 2 --concurrency 16 --out bench-results/ray.json

Smallest settings (a smoke run on the tiny test model):

    .venv-ray/bin/python benchmarks/ray_scale.py --tiny --num-prompts 8 --output-len 8 --concurrency 4 \
        --out bench-results/ray-smoke.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from patchbay_bench.client import random_prompts, run_level
from patchbay_bench.serveproc import stop_serve

BIN = Path(sys.executable).parent
#: where this environment's C++ kernels are built (as patchbay-ray builds them), before any start is timed
KERNELS = os.path.join(sys.prefix, "torch_extensions")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(args) -> Path:
    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model

    if args.tiny:
        return cached_model("tiny-llama", {"arch": "LlamaForCausalLM"},
                            cache_root=Path.home() / ".cache" / "patchbay-tests" / "models")
    return cached_model(f"bench-llama-{args.dtype}", benchmark_model_config(args.dtype))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def replica_pids(dashboard: int) -> list[int]:
    token = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.is_file() else {}
    body = httpx.get(f"http://127.0.0.1:{dashboard}/api/serve/applications/", headers=headers, timeout=10).json()
    return [r["pid"] for app in body["applications"].values() for d in app["deployments"].values()
            for r in d["replicas"] if r["state"] == "RUNNING"]


def wait_answer(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    body = {"model": "bench", "prompt": "warm", "max_tokens": 2}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-4000:]}")
        try:
            if httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no answer in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def run_setting(label: str, model: Path, replicas: int, args, seed: int) -> dict[str, Any]:
    port, dashboard = free_port(), free_port()
    log = Path(args.out).with_suffix(f".{label}.log")
    common = [str(model), "--served-model-name", "bench", "--dtype", args.dtype, "--max-model-len", "1024",
              "--cpu-threads", str(args.threads), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "RAY_ADDRESS": "", "TORCH_EXTENSIONS_DIR": KERNELS}
    if replicas:
        cmd = [str(BIN / "patchbay-ray"), *common, "--num-replicas", str(replicas), "--num-cpus-per-replica",
               str(args.threads), "--dashboard-port", str(dashboard)]
    else:  # patchbay's serve (in .venv-ray the `serve` script is Ray's)
        cmd = [sys.executable, "-m", "patchbay.cli", *common]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_answer(url, proc, log, args.startup_timeout)
        while replicas and len(replica_pids(dashboard)) < replicas:  # every replica up, not just the first
            if time.monotonic() - t0 > args.startup_timeout:
                raise SystemExit(f"{replicas} replicas did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        start_s = time.monotonic() - t0
        pids = replica_pids(dashboard) if replicas else (children(proc.pid) or [proc.pid])
        loaded = [rss_mib(p) for p in pids]
        prompts = random_prompts(args.num_prompts, args.input_len, args.vocab, seed=seed)
        level = asyncio.run(run_level(url, "bench", prompts, args.output_len, args.concurrency, None))
        after = [rss_mib(p) for p in pids]
    finally:
        stop_serve(proc, group=False, timeout=90)
    return {"setting": label, "replicas": replicas or 1, "ray": bool(replicas), "start_s": start_s,
            "rss_mib_loaded": loaded, "rss_mib_after": after, **level}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--concurrency", type=int, default=16, help="the same for every setting")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per model copy")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vocab", type=int, default=None, help="prompt ids below this (default: 8000; tiny: 500)")
    p.add_argument("--tiny", action="store_true", help="the tiny test model (smoke runs)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip plain serve")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--out", default="bench-results/ray-scale.json")
    args = p.parse_args(argv)
    args.vocab = args.vocab or (500 if args.tiny else 8000)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model = model_dir(args)
    os.environ["TORCH_EXTENSIONS_DIR"] = KERNELS
    from patchbay_kernels import cpp

    cpp.load()  # built once here, so no setting's start time includes compiling them
    settings = ([("serve", 0)] if args.baseline else []) + [(f"ray-{n}", n) for n in args.replicas]
    results = []
    for i, (label, n) in enumerate(settings):
        res = run_setting(label, model, n, args, seed=1000 * (i + 1))
        results.append(res)
        print(f"{label}: start {res['start_s']:.1f} s, RSS/process {', '.join(f'{m:.0f}' for m in res['rss_mib_after'])} "
              f"MiB, {res['output_throughput']:.1f} output tok/s at concurrency {args.concurrency}, "
              f"failed {res['failed']}", file=sys.stderr)
    base = results[0]["output_throughput"] if results else 0.0
    for res in results:
        res["throughput_vs_first"] = res["output_throughput"] / base if base else None
    out = {"model": str(model), "dtype": args.dtype, "threads_per_copy": args.threads, "concurrency": args.concurrency,
           "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
           "cores": os.cpu_count(), "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| setting | start s | RSS per process MiB | output tok/s | vs first |")
    print("|---|---|---|---|---|")
    for res in results:
        print(f"| {res['setting']} | {res['start_s']:.1f} | {' / '.join(f'{m:.0f}' for m in res['rss_mib_after'])} | "
              f"{res['output_throughput']:.1f} | {res['throughput_vs_first']:.2f}x |")
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
