"""Hardening through a real ``serve`` process and the official ``openai`` client: a full waiting queue is the
client's ``RateLimitError`` (429, ``Retry-After``) at once; a client that never reads its stream and a client
that trickles its body hold nobody else up; a constraint compile past --structured-outputs-compile-memory is a
400 naming the limit, and the server stays healthy and small. Each ends with the gauges back at idle."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx
import openai
import pytest

from serverkit import serve

pytestmark = pytest.mark.e2e
KEY = "sk-hardening"
H = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = [str(tiny_llama), "--served-model-name", "tiny", "--max-model-len", "2048", "--api-key", KEY,
            "--max-num-seqs", "2", "--max-waiting-seqs", "2", "--structured-outputs-compile-memory", "200MiB",
            "--structured-outputs-compile-timeout", "120"]
    with serve(args, tmp_path_factory.mktemp("hardening")) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def wait_idle(server, timeout: float = 60.0) -> dict:
    return server.wait_idle(KEY, timeout)


def raw_request(server, body: bytes, path: str = "/v1/completions", rcvbuf: int | None = None) -> socket.socket:
    """A socket that has sent the request head (and ``body``, which may be only a part of what the
    Content-Length of the head announces — see the callers)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(120)
    sock.sendall(body)
    return sock


def head(body_len: int, path: str = "/v1/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {body_len}\r\nConnection: close\r\n\r\n").encode()


def read_all(sock: socket.socket) -> tuple[bytes, bytes]:
    """``(status line, body)`` of the response, its chunked transfer coding undone."""
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    head_, _, body = bytes(out).partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head_.lower():
        return head_.split(b"\r\n", 1)[0], body
    plain = bytearray()
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return head_.split(b"\r\n", 1)[0], bytes(plain)
        plain += body[:n]
        body = body[n + 2:]


def test_a_full_queue_is_the_official_clients_rate_limit_error(server, client):
    """Two long streams run and two wait (--max-num-seqs 2, --max-waiting-seqs 2): completions, streamed
    completions, chat and the Responses API through the official client raise RateLimitError at once, with
    Retry-After and the envelope; a client with its retries on waits that second and, the holders gone, is
    served on its second try."""
    body = {"model": "tiny", "prompt": "hold", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    http = httpx.Client(base_url=server.url, headers=H, timeout=120)
    holders: list[httpx.Response] = []

    def hold():  # a stream's head may come with its first token: each holder opens in its own thread
        holders.append(http.send(http.build_request("POST", "/v1/completions", json=body), stream=True))

    def until(gauge: str, value: int) -> None:
        deadline = time.monotonic() + 30
        while server.metrics(KEY)[gauge] < value:
            assert time.monotonic() < deadline, server.metrics(KEY)
            time.sleep(0.02)

    threads = [threading.Thread(target=hold) for _ in range(4)]
    try:
        for t in threads[:2]:  # two run (four arriving together would find the queue full at once)
            t.start()
        until("num_requests_running", 2)
        for t in threads[2:]:  # and two wait
            t.start()
        until("num_requests_waiting", 2)
        calls = [
            lambda: client.completions.create(model="tiny", prompt="x", max_tokens=2),
            lambda: client.completions.create(model="tiny", prompt="x", max_tokens=2, stream=True),
            lambda: client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2),
            lambda: client.responses.create(model="tiny", input="x", max_output_tokens=2),
        ]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(openai.RateLimitError) as info:
                call()
            assert time.monotonic() - start < 5
            err = info.value
            assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
            assert err.code == "server_overloaded" and err.body["type"] and err.body["param"] is None
        # with its retries on, the client waits the Retry-After second and gets through once the queue drains
        statuses: list[int] = []
        retrying = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=3, timeout=60,
                                 http_client=httpx.Client(event_hooks={"response": [
                                     lambda r: statuses.append(r.status_code)]}))
        result = {}

        def call():
            start = time.monotonic()
            result["r"] = retrying.completions.create(model="tiny", prompt="x", max_tokens=2)
            result["seconds"] = time.monotonic() - start

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 5
        while not statuses:  # its first try has met the full queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        for t in threads:
            if t.ident is not None:
                t.join(30)
        for r in holders:
            r.close()
        http.close()
    thread.join(60)
    assert statuses == [429, 200] and result["seconds"] >= 0.9, (statuses, result)
    assert result["r"].usage.completion_tokens == 2
    wait_idle(server)


def kernel_queued(local_port: int) -> int:
    """Bytes the kernel holds for the loopback connection from ``local_port`` (in both directions: the
    server's unsent queue and this side's unread one), from /proc/net/tcp."""
    total = 0
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        ports = {int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)}
        if local_port in ports:
            tx, rx = (int(v, 16) for v in fields[4].split(":"))
            total += tx + rx
    return total


@pytest.fixture(scope="module")
def roomy(tiny_llama, tmp_path_factory):
    args = [str(tiny_llama), "--served-model-name", "tiny", "--max-model-len", "2048", "--api-key", KEY,
            "--max-num-seqs", "4"]
    with serve(args, tmp_path_factory.mktemp("roomy")) as s:
        yield s


def test_a_client_that_never_reads_holds_nobody_up(roomy):
    """Three chat choices of 1,900 tokens with 20 top logprobs each (megabytes of stream) for a client that
    reads nothing until they are generated: the kernel holds only a part (the server's writes are blocked
    and the rest waits in the server), while other clients are served at their usual pace. When it
    finally reads, its whole stream is there, in order, ending with [DONE]."""
    server = roomy
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    payload = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 1900, "ignore_eos": True, "n": 3,
                          "stream": True, "logprobs": True, "top_logprobs": 20}).encode()
    slow = raw_request(server, head(len(payload), "/v1/chat/completions") + payload, rcvbuf=4096)
    try:
        time.sleep(0.5)
        for _ in range(6):
            start = time.monotonic()
            r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8,
                                               extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 8 and time.monotonic() - start < 10
        wait_idle(server, timeout=120)  # the slow stream's tokens are all generated (and its blocks freed)
        held = kernel_queued(slow.getsockname()[1])
    finally:
        status, body = read_all(slow)
    assert b" 200 " in status, (status, body[:300])
    assert 0 < held < len(body) - 2**20, (held, len(body))  # megabytes waited in the server, its writes blocked
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    tokens: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for chunk in map(json.loads, events[:-1]):
        for choice in chunk["choices"]:
            if choice["logprobs"]:
                tokens[choice["index"]] += [t["token"] for t in choice["logprobs"]["content"]]
                assert all(len(t["top_logprobs"]) == 20 for t in choice["logprobs"]["content"])
    assert [len(t) for t in tokens.values()] == [1900] * 3  # nothing lost
    assert server.metrics(KEY)["request_success_total{finished_reason=length}"] >= 6 + 3


def test_a_client_that_trickles_its_body_holds_nobody_up(server, client):
    """A body announced at its full length but sent a few bytes at a time, over seconds: others are served
    meanwhile, and the trickled request is answered when its body is complete."""
    payload = json.dumps({"model": "tiny", "prompt": "trickle", "max_tokens": 3, "ignore_eos": True}).encode()
    sock = raw_request(server, head(len(payload)) + payload[:5])
    served = []

    def others():
        for _ in range(4):
            start = time.monotonic()
            r = client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"ignore_eos": True})
            served.append((r.usage.completion_tokens, time.monotonic() - start))

    thread = threading.Thread(target=others)
    thread.start()
    for i in range(5, len(payload), 8):
        time.sleep(0.1)
        sock.sendall(payload[i:i + 8])
    thread.join(60)
    status, body = read_all(sock)
    assert b" 200 " in status, (status, body[:300])
    assert json.loads(body)["usage"]["completion_tokens"] == 3
    assert [n for n, _ in served] == [4] * 4 and max(s for _, s in served) < 10, served
    wait_idle(server)


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def test_a_memory_hungry_compile_is_a_400_and_the_server_stays_healthy(server, client):
    """``[ab]*a[ab]{20}`` needs an automaton of 2**20 states: its worker process hits the 200 MiB address
    space limit, the client gets a 400 naming the flag, the server's processes stay small, and the next
    constrained request is served."""
    before = _tree_rss(server.proc.pid)
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=2,
                                  extra_body={"guided_regex": "[ab]*a[ab]{20}"})
    assert info.value.code == "constraint_compile_memory", info.value.body
    assert "--structured-outputs-compile-memory" in info.value.body["message"]
    assert time.monotonic() - start < 120
    assert httpx.get(server.url + "/health").status_code == 200
    assert _tree_rss(server.proc.pid) - before < 300 * 2**20
    r = client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0,
                                  extra_body={"guided_regex": "(yes|no)"})
    assert r.choices[0].text in ("yes", "no")
    wait_idle(server)
