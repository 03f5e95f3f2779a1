"""Start a real ``serve`` process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

SERVE = str(Path(sys.executable).with_name("serve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self, api_key: str | None = None) -> dict[str, float]:
        """``/metrics`` as ``{name without "vllm:" (+ "{label=value}" beyond model_name): value}``."""
        from prometheus_client.parser import text_string_to_metric_families

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        text = httpx.get(self.url + "/metrics", timeout=10, headers=headers).text
        return parse_metrics(text)

    def wait_idle(self, api_key: str | None = None, timeout: float = 60.0) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits and the KV cache is empty; the last reading."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics(api_key)
            if m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0 and m["kv_cache_usage_perc"] == 0:
                return m
            assert time.monotonic() < deadline, f"not idle: {m}"
            time.sleep(0.1)


def parse_metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            extra = {k: v for k, v in sample.labels.items() if k != "model_name"}
            suffix = "{" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + "}" if extra else ""
            out[sample.name.removeprefix("vllm:") + suffix] = sample.value
    return out


def run_serve(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([SERVE, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


@contextmanager
def serve(args: list[str], tmp_path: Path, env: dict[str, str] | None = None, startup_timeout: float = 180) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as fh:
        proc = subprocess.Popen([SERVE, *args, "--host", "127.0.0.1", "--port", str(port)], stdout=fh,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}:\n{server.output()}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not come up:\n{server.output()}")
            time.sleep(0.25)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
