"""A real ``serve`` process for the benchmarks: start it, wait for ``/health``, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

BIN = Path(sys.executable).parent


def start_serve(model: str | Path, port: int, args: list[str], log: Path, *, threads: int | None = None,
                timeout: float = 300) -> subprocess.Popen:
    """``serve MODEL --host 127.0.0.1 --port PORT *args`` in its own process group, output to ``log``;
    returns once ``/health`` answers 200 (exits with the log if the server dies or never comes up)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([str(BIN / "serve"), str(model), "--host", "127.0.0.1", "--port", str(port), *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_healthy(proc, f"http://127.0.0.1:{port}", log, timeout, lambda: stop_serve(proc))
    return proc


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float, stop: Callable[[], None]) -> None:
    """Return once ``url/health`` answers 200; exit with the log's tail when ``proc`` dies first, or
    (after ``stop()``) when it does not come up within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{log.name}: the server exited:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop()
    raise SystemExit(f"{log.name}: the server did not come up in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop_serve(proc: subprocess.Popen, *, group: bool = True, timeout: float = 30) -> None:
    """SIGINT (a graceful stop) to the process group, or with ``group=False`` to the process alone
    (which then stops what it started, as patchbay-ray does); SIGKILL to the group after ``timeout`` s."""
    if proc.poll() is not None:
        return
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
