"""The hostile-input corpus: each input on its own line with the status (and ``param``) it must get — never a
5xx, never a hang, always OpenAI's envelope. docs/reliability.md lists what each line tries."""

from __future__ import annotations

import time

import pytest

from apikit import api_client, assert_error, health_while

CHAT, COMP, EMB, TOK = "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"
RESP, AUDIO = "/v1/responses", "/v1/audio/transcriptions"
MSG = [{"role": "user", "content": "hi"}]
J = {"Content-Type": "application/json"}
DEEP = b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
TPL = "{% for m in messages %}{{ m.content }}{% endfor %}"
DEEP_TOOL = '{"type": "object", "properties": {"a": ' * 200 + "{}" + "}}" * 200
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}

# (route, raw body or JSON value, headers, status, param)
CORPUS = [
    (COMP, DEEP, J, 400, None),
    (COMP, b'{"prompt": "x", "max_tokens": 1}', {"Content-Type": "text/plain"}, 415, None),
    (COMP, b'{"prompt": "x", "max_tokens": 1}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    (COMP, b'{"prompt": "\xff\xfe", "max_tokens": 1}', J, 400, None),
    (COMP, b'{"prompt": "x", "temperature": NaN}', J, 400, "temperature"),
    (COMP, b'{"prompt": "x", "temperature": Infinity}', J, 400, "temperature"),
    (COMP, b'{"prompt": "x", "temperature": 1e999}', J, 400, "temperature"),
    (COMP, b'{"prompt": "x", "logit_bias": {"5": -Infinity}}', J, 400, "logit_bias.5"),
    (COMP, b'[NaN]', J, 400, None),
    (COMP, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", J, 400, "max_tokens"),
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
    (CHAT, {"model": 5, "messages": MSG}, J, 400, "model"),
    (CHAT, {"model": "nope", "messages": MSG}, J, 404, "model"),
    (CHAT, {"messages": [{"role": "user", "content": [IMAGE_PART]}]}, J, 400, "messages[0].content[0].type"),
    (RESP, b'{"input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", J, 400, None),
    (RESP, b'{"input": "x", "tools": [{"type": "function", "name": "f", "parameters": ' + DEEP_TOOL.encode()
     + b"}]}", J, 400, None),
    (RESP, {"input": "x", "max_output_tokens": 2**70}, J, 400, "max_output_tokens"),
    (RESP, {"input": "x", "top_logprobs": 2**70}, J, 400, "top_logprobs"),
    (RESP, b'{"input": "x", "temperature": NaN}', J, 400, "temperature"),
    (RESP, [{"input": "x"}], J, 400, None),
    (RESP, b'{"input": "x"}', {"Content-Type": "text/plain"}, 415, None),
    (RESP, {"input": "x", "previous_response_id": "resp_nope"}, J, 404, "previous_response_id"),
    (RESP, {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]},
     J, 400, "input[0].content[0].type"),
    (RESP + "/resp_nope/cancel", {}, J, 404, "response_id"),
    (AUDIO, {"file": "x", "model": "tiny"}, J, 415, None),
    (AUDIO, b"--zzz\r\n\xff\xfe garbage", {"Content-Type": "multipart/form-data; boundary=zzz"}, 400, None),
    (AUDIO, b"--zzz garbage", {"Content-Type": "multipart/form-data"}, 400, None),
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


@pytest.fixture(scope="module")
def whisper_client(tiny_whisper):
    with api_client(tiny_whisper, max_model_len=None) as c:
        yield c


@pytest.fixture(scope="module")
def llava_client(tiny_llava):
    with api_client(tiny_llava) as c:
        yield c


JUNK = ("a.wav", b"RIFFxxxxWAVEjunk", "audio/wav")


@pytest.mark.parametrize("data, files, param", [
    ({}, {"file": JUNK}, "file"),
    ({}, {"file": ("a.wav", b"", "audio/wav")}, "file"),
    ({"model": "tiny"}, None, "file"),
    ({"file": "text, not a file"}, None, "file"),
    ({}, [("file", JUNK), ("file", JUNK)], "file"),
    ({"temperature": str(2**70)}, {"file": JUNK}, "temperature"),
    ({"temperature": "1e999"}, {"file": JUNK}, "temperature"),
    ({"temperature": "NaN"}, {"file": JUNK}, "temperature"),
    ({"seed": str(2**70)}, {"file": JUNK}, "seed"),
    ({"response_format": "exe"}, {"file": JUNK}, "response_format"),
    ({"bogus": "1"}, {"file": JUNK}, "bogus"),
    ({"model": "nope"}, {"file": JUNK}, "model"),
])
def test_speech_form_corpus(whisper_client, data, files, param):
    """The audio routes take multipart forms: every bad field or file is a 4xx naming it (a form without any
    file goes url-encoded, which can carry no file: a 415 naming the media type)."""
    if files is None:
        assert_error(whisper_client.post(AUDIO, data=data, files=files), 415, None, contains="multipart/form-data")
    else:
        assert_error(whisper_client.post(AUDIO, data=data, files=files), 404 if param == "model" else 400, param)
    assert whisper_client.get("/health").status_code == 200


def _png(width: int, height: int) -> str:
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64,!!!!", "invalid_image"),
    ("data:image/png;base64,AAAA", "invalid_image"),
    ("data:image/png;base64,", "invalid_image"),
    ("data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=", None),
    ("ftp://127.0.0.1/x.png", "invalid_image_url"),
    ("file:///etc/passwd", None),
    ("__big__", "image_too_large"),  # 20,000 x 20,000 pixels in a 1.2 MB PNG
])
def test_image_corpus(llava_client, url, code):
    if url == "__big__":
        url = _png(20_000, 20_000)
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}
    err = assert_error(llava_client.post(CHAT, json=body), 400, "messages[0].content[1]")
    assert code is None or err["code"] == code, err
    assert llava_client.get("/health").status_code == 200


REALTIME = [
    ("not json", "invalid_json", None),
    ("[1]", "invalid_event", "type"),
    ('{"type": "nope"}', "unknown_event", "type"),
    ("[" * 10_000 + "]" * 10_000, "nesting_too_deep", None),
    ('{"type": "session.update", "x": ' + "[" * 10_000 + "]" * 10_000 + "}", "nesting_too_deep", None),
    ('{"type": "session.update", "prompt": 1e999}', "invalid_json", "prompt"),
    ('{"type": "session.update", "prompt": NaN}', "invalid_json", "prompt"),
    ('{"type": "session.update", "bogus": 1}', "invalid_event", "bogus"),
    ('{"type": "session.update", "model": "nope"}', "model_not_found", "model"),
    ('{"type": "session.update", "language": 5}', "invalid_language", "language"),
    ('{"type": "input_audio_buffer.append", "audio": "!!!"}', "invalid_audio", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "YWJj"}', "invalid_audio", "audio"),  # 3 bytes: odd
    ('{"type": "input_audio_buffer.commit", "final": "yes"}', "invalid_event", "final"),
    ('{"type": "input_audio_buffer.commit", "final": true}', "empty_audio", "audio"),
    (b"\x00\x01", "invalid_event", None),
]


def test_realtime_event_corpus(whisper_client):
    """/v1/realtime: each hostile event is an error event naming its code and field, and the session goes on
    (a 10,000-deep event ended the session without a word, leaving the client waiting)."""
    with whisper_client.websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["type"] == "session.created"
        for event, code, param in REALTIME:
            ws.send_bytes(event) if isinstance(event, bytes) else ws.send_text(event)
            got = ws.receive_json()
            assert (got["type"], got["code"], got["param"]) == ("error", code, param), (event[:50], got)
        ws.send_text('{"type": "session.update", "language": "en"}')
        assert ws.receive_json() == {"type": "session.updated", "model": "tiny", "language": "en"}


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
