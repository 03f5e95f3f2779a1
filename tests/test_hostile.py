"""The hostile-input corpus: each input on its own line with the status (and ``param``) it must get — never a
5xx, never a hang, always OpenAI's envelope. docs/reliability.md lists what each line tries."""

from __future__ import annotations

import time

import pytest

from apikit import api_client, assert_error, health_while

CHAT, COMP, EMB, TOK = "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"
MSG = [{"role": "user", "content": "hi"}]
J = {"Content-Type": "application/json"}
DEEP = b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
TPL = "{% for m in messages %}{{ m.content }}{% endfor %}"

# (route, raw body or JSON value, headers, status, param)
CORPUS = [
    (COMP, DEEP, J, 400, None),
    (COMP, b'{"prompt": "x", "max_tokens": 1}', {"Content-Type": "text/plain"}, 415, None),
    (COMP, b'{"prompt": "x", "max_tokens": 1}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    (COMP, b'{"prompt": "\xff\xfe", "max_tokens": 1}', J, 400, None),
    (COMP, b'{"prompt": "x", "temperature": NaN}', J, 400, None),
    (COMP, b'{"prompt": "x", "temperature": Infinity}', J, 400, None),
    (COMP, b'{"prompt": "x", "temperature": 1e999}', J, 400, None),
    (COMP, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", J, 400, None),
    (COMP, {"prompt": "x", "n": 2**70}, J, 400, "n"),
    (COMP, {"prompt": "x", "logprobs": 2**70}, J, 400, "logprobs"),
    (COMP, {"prompt": "x", "seed": 2**70}, J, 400, "seed"),
    (COMP, {"prompt": "x", "max_tokens": 2**70}, J, 400, "max_tokens"),
    (COMP, {"prompt": "x", "top_k": 2**63}, J, 200, None),
    (COMP, {"prompt": "x", "seed": 2**64 - 1, "max_tokens": 1}, J, 200, None),
    (COMP, {"prompt": [0, 1, 10**9]}, J, 400, "prompt"),
    (COMP, {"prompt": [[5, -1]]}, J, 400, "prompt"),
    (COMP, {"prompt": "x", "stop_token_ids": [10**9]}, J, 400, "stop_token_ids"),
    (COMP, {"prompt": "x", "logit_bias": {"999999": 1}}, J, 400, "logit_bias"),
    (COMP, [1, 2, 3], J, 400, None),
    (COMP, "a string", J, 400, None),
    (COMP, None, J, 400, None),
    (COMP, b"", J, 400, None),
    (COMP, {"prompt": "x", "max_tokens": 0}, J, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "top_logprobs": 2**70, "logprobs": True}, J, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "n": -(2**70)}, J, 400, "n"),
    (TOK, {"prompt": "x" * 10, "extra": {"a": [[[[1]]]]}}, J, 400, "extra"),
    (CHAT, {"messages": MSG, "chat_template": "{% include 'secret.txt' %}"}, J, 400, "chat_template"),
    (CHAT, {"messages": MSG, "chat_template": "{% import 'x' as y %}"}, J, 400, "chat_template"),
    (CHAT, {"messages": MSG, "chat_template": "{% extends 'base.html' %}"}, J, 400, "chat_template"),
    (CHAT, {"messages": MSG, "chat_template": "{% for i in range(10**9) %}{% endfor %}"}, J, 400, "messages"),
    (CHAT, {"messages": MSG, "chat_template": "{% for i in range(99999) %}{% for j in range(99999) %}"
                                              "{% endfor %}{% endfor %}"}, J, 400, "messages"),
    (CHAT, {"messages": MSG, "chat_template": "{{ 'a' * 10**10 }}"}, J, 400, "messages"),
    (CHAT, {"messages": MSG, "chat_template": "{{ 'a'|center(10**10) }}"}, J, 400, "messages"),
    (CHAT, {"messages": MSG, "chat_template": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
                                              "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"}, J, 400, "messages"),
    (CHAT, {"messages": MSG, "chat_template": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"}, J, 400, "messages"),
    (CHAT, {"messages": MSG, "chat_template": "{{ ''.__class__.__mro__ }}"}, J, 400, "messages"),
    (CHAT, {"messages": MSG, "chat_template": TPL, "max_tokens": 1}, J, 200, None),
]


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama, trust_request_chat_template=True, chat_template_render_timeout=1.0) as c:
        yield c


@pytest.mark.parametrize("route, body, headers, status, param", CORPUS,
                         ids=[f"{i}-{c[0]}-{c[3]}" for i, c in enumerate(CORPUS)])
def test_corpus(client, route, body, headers, status, param):
    content = body if isinstance(body, bytes) else __import__("json").dumps(body).encode()
    start = time.monotonic()
    r = client.post(route, content=content, headers=headers)
    assert time.monotonic() - start < 10, "no hang"
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert_error(r, status, param)
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"input": ["a"] * 2049}, "input"),
    ({"input": [[1, 2]] * 3000}, "input"),
    ({"input": "x", "dimensions": 2**70}, "dimensions"),
    ({"input": [10**9]}, "input"),
])
def test_pooling_corpus(tiny_encoder_factory, body, param):
    with api_client(tiny_encoder_factory("BertModel", sentence_transformers=True), max_model_len=None) as c:
        assert_error(c.post(EMB, json=body), 400, param)
        assert c.post(EMB, json={"input": ["a"] * 2048}).status_code == 200


def test_a_body_over_the_size_limit_is_a_413(tiny_llama):
    with api_client(tiny_llama, max_request_body_bytes=1024) as c:
        assert_error(c.post(COMP, json={"prompt": "x" * 2048}), 413)
        assert c.post(COMP, json={"prompt": "x", "max_tokens": 1}).status_code == 200


RUNAWAY = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"


def test_a_runaway_render_stops_itself(client):
    """The render stops at its time limit: no thread keeps burning CPU after the 400."""
    start = time.monotonic()
    r = client.post(CHAT, json={"messages": MSG, "chat_template": RUNAWAY})
    assert_error(r, 400, "messages", contains="1 s")
    assert 0.9 < time.monotonic() - start < 5
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(1.0)
    assert time.process_time() - cpu < 0.2 * (time.monotonic() - wall)  # this whole process is idle again


def test_a_runaway_render_does_not_hold_the_event_loop(client):
    """Templates render in a render thread: while one runs into its 1 s budget, /health keeps answering."""
    r, latencies = health_while(client, lambda: client.post(CHAT, json={"messages": MSG, "chat_template": RUNAWAY}))
    assert_error(r, 400, "messages")
    assert len(latencies) >= 5 and max(latencies) < 0.5, latencies


def test_a_long_request_template_is_refused_before_it_compiles(client):
    """Compiling Jinja cannot be interrupted: a request's template is at most 64 KiB."""
    template = "{% for m in messages %}" + "{{ m.role }}{% if m.content %}x{% endif %}" * 2000 + "{% endfor %}"
    start = time.monotonic()
    assert_error(client.post(CHAT, json={"messages": MSG, "chat_template": template}), 400, "chat_template",
                 contains="65536")
    assert time.monotonic() - start < 2
