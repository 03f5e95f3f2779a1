"""patchbay-ray end to end on a local Ray cluster: two replicas of a tiny model behind Ray Serve's
proxy, answers from both, a killed replica replaced while the openai client (default retries) sees
no failed request, and a clean shutdown; then a cluster given with --address, which outlives us."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from patchbay_bench.serveproc import stop_serve

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
KEY = "sk-ray"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: the Ray processes run on loopback only (see patchbay_ray.cli)
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Launched:
    def __init__(self, proc: subprocess.Popen, port: int, dashboard: int, log: Path):
        self.proc, self.port, self.dashboard, self.log = proc, port, dashboard, log
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def replicas(self, name: str = "patchbay") -> list[dict]:
        """The replicas Ray Serve's status API reports (the dashboard wants the cluster's token)."""
        token = Path.home() / ".ray" / "auth_token"
        headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.is_file() else {}
        body = httpx.get(f"http://127.0.0.1:{self.dashboard}/api/serve/applications/", headers=headers,
                         timeout=10).json()
        app = body["applications"].get(name)
        return [r for d in (app or {}).get("deployments", {}).values() for r in d["replicas"]]

    def running(self) -> dict[str, int]:
        """replica id -> pid of every RUNNING replica."""
        return {r["replica_id"]: r["pid"] for r in self.replicas() if r["state"] == "RUNNING"}


@contextmanager
def launch(args: list[str], tmp_path: Path, *, dashboard: int | None = None, startup: float = 900,
           env: dict[str, str] | None = None) -> Iterator[Launched]:
    port, dashboard = free_port(), dashboard or free_port()
    log = tmp_path / f"patchbay-ray-{port}.log"
    full = [str(BIN / "patchbay-ray"), *args, "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
            "--dashboard-port", str(dashboard)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **LOCAL_ENV, **(env or {})})
    launched = Launched(proc, port, dashboard, log)
    try:
        deadline = time.monotonic() + startup
        while "ready in" not in launched.output():
            assert proc.poll() is None, f"patchbay-ray exited with {proc.returncode}:\n{launched.output()}"
            assert time.monotonic() < deadline, f"patchbay-ray did not come up:\n{launched.output()}"
            time.sleep(1)
        yield launched
    finally:
        stop_serve(proc, group=False, timeout=90)  # (after a failed test) as a user would, then for sure


def ask(client: openai.OpenAI, i: int) -> str:
    """One completion; the replica that answered."""
    raw = client.completions.with_raw_response.create(model="tiny", prompt=f"Request {i}:", max_tokens=4,
                                                      extra_body={"ignore_eos": True})
    assert raw.parse().usage.completion_tokens == 4
    return raw.headers["x-patchbay-replica"]


def test_two_replicas_answer_survive_a_kill_and_shut_down(tiny_llama, tmp_path):
    args = [str(tiny_llama), "--served-model-name", "tiny", "--max-model-len", "256", "--num-replicas", "2"]
    with launch(args, tmp_path) as ray:
        client = openai.OpenAI(base_url=ray.url + "/v1", api_key=KEY)  # the client's default retries
        t0 = time.monotonic()
        while len(ray.running()) < 2:
            assert time.monotonic() - t0 < 120, ray.replicas()
            time.sleep(1)
        first = ray.running()
        seen = {ask(client, i) for i in range(24)}
        assert seen == set(first), (seen, first)  # both answer, under the ids the status API reports

        # every route answers through the proxy as from serve: streams, API key, envelopes
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, stream=True, extra_body={"ignore_eos": True})
        assert sum(1 for c in stream if c.choices and c.choices[0].delta.content) >= 1
        r = httpx.post(ray.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["x-patchbay-replica"] in first
        r = httpx.post(ray.url + "/v1/completions", headers=AUTH, json={"model": "nope", "prompt": "x"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert httpx.get(ray.url + "/health", timeout=10).status_code == 200

        # kill one replica's process while clients keep asking: Ray replaces it, nobody sees a failure
        failures: list[BaseException] = []
        answered: list[str] = []
        stop = threading.Event()

        def hammer(worker: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    answered.append(ask(client, worker * 100_000 + i))
                except BaseException as exc:  # noqa: BLE001 - every failure is the test's business
                    failures.append(exc)
                i += 1

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        victim, victim_pid = sorted(first.items())[0]
        os.kill(victim_pid, signal.SIGKILL)
        deadline = time.monotonic() + 300
        try:
            while True:
                now = ray.running()
                new = set(now) - set(first)
                if len(now) == 2 and new and new & set(answered[-50:]):
                    break
                assert time.monotonic() < deadline, (now, ray.replicas())
                time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not failures, failures[:3]
        assert victim not in ray.running() and not alive(victim_pid)
        assert len(answered) > 20
        pids = list(ray.running().values())

        # SIGTERM: the application is deleted, Ray Serve and the local cluster stop, exit 0 within 60 s
        t0 = time.monotonic()
        ray.proc.send_signal(signal.SIGTERM)
        assert ray.proc.wait(60) == 0, ray.output()[-3000:]
        assert time.monotonic() - t0 < 60
        time.sleep(2)
        assert not port_open(ray.port) and not port_open(ray.dashboard)
        assert not any(alive(pid) for pid in pids)


def test_a_given_cluster_keeps_running_and_replicas_serve_several_models(tiny_llama, tiny_encoder, tmp_path):
    # a cluster that `ray start` made wants its token from every client that connects (Ray's own rule)
    auth = {**LOCAL_ENV, "RAY_AUTH_MODE": "token"}
    gcs, dashboard = free_port(), free_port()
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "1",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--node-ip-address", "127.0.0.1", "--disable-usage-stats"],
                            stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **auth})
    try:
        address = f"127.0.0.1:{gcs}"
        config = tmp_path / "serve.yaml"
        config.write_text(textwrap.dedent(f"""
            max-model-len: 128
            models:
              - {{model: {tiny_llama}, served-model-name: [tiny, chat]}}
              - {{model: {tiny_encoder}, served-model-name: emb}}
        """))
        with launch(["--config", str(config), "--address", address, "--name", "pb"], tmp_path,
                    dashboard=dashboard, env=auth) as ray:
            client = openai.OpenAI(base_url=ray.url + "/v1", api_key=KEY, max_retries=0)
            assert [m.id for m in client.models.list().data] == ["tiny", "chat", "emb"]
            assert client.completions.create(model="chat", prompt="hi", max_tokens=2).model == "chat"
            assert len(client.embeddings.create(model="emb", input="a cat").data[0].embedding) > 0
            assert [r["replica_id"] for r in ray.replicas("pb")]
            ray.proc.send_signal(signal.SIGINT)
            assert ray.proc.wait(60) == 0, ray.output()[-3000:]
        assert head.poll() is None  # the cluster we were given keeps running
        status = subprocess.run([str(BIN / "ray"), "status", "--address", address], capture_output=True, text=True,
                                timeout=120, env={**os.environ, **auth})
        assert status.returncode == 0, status.stdout + status.stderr
        assert not port_open(ray.port)  # Ray Serve's proxy is gone with Serve
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        head_log.close()
