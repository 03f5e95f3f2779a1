"""The OpenAI text API in-process: shapes, parameters, errors in the envelope."""

from __future__ import annotations

import logging

import pytest

from apikit import api_client, assert_error, sse_events

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama) as c:
        yield c


def greedy_text(client, prompt, n=16, **extra):
    r = client.post(COMP, json={"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- models / health


def test_models_and_health(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny"]
    assert data["data"][0]["max_model_len"] == 256
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert_error(client.get("/v1/models/other"), 404, "model")
    assert client.get("/health").status_code == 200
    assert client.get("/version").json()["version"]


# --------------------------------------------------------------------------- completions


def test_completion_shape_and_usage(client):
    body = greedy_text(client, "Once upon a time", n=7)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and isinstance(choice["text"], str)
    prompt_len = len(client.model.encode("Once upon a time"))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 7, "total_tokens": prompt_len + 7}


def test_prompt_forms_agree(client):
    text = "The quick brown fox"
    ids = client.model.encode(text)
    by_text = greedy_text(client, text)["choices"][0]["text"]
    assert greedy_text(client, ids)["choices"][0]["text"] == by_text
    many = greedy_text(client, [text, "Another prompt"])
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["choices"][0]["text"] == by_text
    many_ids = greedy_text(client, [ids, client.model.encode("Another prompt")])
    assert [c["text"] for c in many_ids["choices"]] == [c["text"] for c in many["choices"]]


def test_echo_prepends_the_prompt(client):
    plain = greedy_text(client, "Echo this", n=4)["choices"][0]["text"]
    echoed = greedy_text(client, "Echo this", n=4, echo=True)["choices"][0]["text"]
    assert echoed == "Echo this" + plain


def test_n_choices_and_seed(client):
    body = client.post(COMP, json={"prompt": "Seeds", "max_tokens": 8, "n": 3, "seed": 7, "temperature": 1.0,
                                   "ignore_eos": True}).json()
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len(set(texts)) > 1, "n choices with one seed must still differ"
    again = client.post(COMP, json={"prompt": "Seeds", "max_tokens": 8, "n": 3, "seed": 7, "temperature": 1.0,
                                    "ignore_eos": True}).json()
    assert [c["text"] for c in again["choices"]] == texts
    assert body["usage"]["completion_tokens"] == 24


def test_stop_string_is_not_part_of_the_output(client):
    text = greedy_text(client, "Stop strings", n=16)["choices"][0]["text"]
    stop = text[6:9]
    cut = text.find(stop)
    body = greedy_text(client, "Stop strings", n=16, stop=[stop, "\u2603never"])
    choice = body["choices"][0]
    assert choice["text"] == text[:cut] and choice["finish_reason"] == "stop" and choice["stop_reason"] == stop


def test_max_tokens_is_clamped_to_the_context_left(client):
    ids = client.model.encode("word " * 400)[:250]
    body = client.post(COMP, json={"prompt": ids, "max_tokens": 100, "temperature": 0, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 6
    assert body["choices"][0]["finish_reason"] == "length"


def test_prompt_longer_than_context_names_both_numbers(client):
    ids = client.model.encode("word " * 400)[:300]
    err = assert_error(client.post(COMP, json={"prompt": ids}), 400, "prompt")
    assert "256" in err["message"] and "300" in err["message"]


def test_completion_stream(client):
    r = client.post(COMP, json={"prompt": "Stream", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == greedy_text(client, "Stream", n=6)["choices"][0]["text"]
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events[:-2])


# --------------------------------------------------------------------------- chat


def chat(client, messages=MSG, **extra):
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    return client.post(CHAT, json=body)


def test_chat_shape(client):
    r = chat(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_content_parts_equal_string_content(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story about a cat."}]}]
    assert chat(client, parts).json()["choices"][0]["message"] == chat(client).json()["choices"][0]["message"]


def test_chat_uses_the_template_and_generation_prompt(client):
    tok = client.model.tokenizer
    expected = tok.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    body = chat(client).json()
    assert body["usage"]["prompt_tokens"] == len(tok.encode(expected, add_special_tokens=False))
    no_gen = chat(client, add_generation_prompt=False).json()
    assert no_gen["usage"]["prompt_tokens"] < body["usage"]["prompt_tokens"]


def test_max_completion_tokens_wins(client):
    body = chat(client, max_completion_tokens=3, max_tokens=9).json()
    assert body["usage"]["completion_tokens"] == 3


def test_chat_stream_with_usage(client):
    r = chat(client, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    first = events[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" in e for e in events[:-1])
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert content == chat(client).json()["choices"][0]["message"]["content"]
    assert events[-2]["usage"]["completion_tokens"] == 8


def test_chat_stream_n2(client):
    r = chat(client, stream=True, n=2, temperature=1.0, seed=3)
    events = [e for e in sse_events(r.text) if e != "[DONE]"]
    finishes = {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in events
                if e["choices"][0]["finish_reason"]}
    assert finishes == {0: "length", 1: "length"}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, 400, "messages[0].role"),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": MSG, "n": 0}, 400, "n"),
        ({"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ({"messages": MSG, "temperature": -0.5}, 400, "temperature"),
        ({"messages": MSG, "temperature": "hot"}, 400, "temperature"),
        ({"messages": MSG, "top_p": 0}, 400, "top_p"),
        ({"messages": MSG, "top_p": 1.5}, 400, "top_p"),
        ({"messages": MSG, "min_p": 2}, 400, "min_p"),
        ({"messages": MSG, "top_k": -3}, 400, "top_k"),
        ({"messages": MSG, "n": 1.5}, 400, "n"),
        ({"messages": MSG, "stream": "yes"}, 400, "stream"),
        ({"messages": MSG, "stop": [""]}, 400, "stop"),
        ({"messages": MSG, "stop": 5}, 400, "stop"),
        ({"messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"messages": MSG, "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
        ({"messages": MSG, "frobnicate": 1}, 400, "frobnicate"),
        ({"messages": MSG, "logit_bias": {"abc": 10}}, 400, "logit_bias"),
        ({"messages": MSG, "logit_bias": {"5": 1000}}, 400, "logit_bias"),
        ({"messages": MSG, "guided_regex": "a("}, 400, "guided_regex"),
        ({"messages": MSG, "guided_regex": "a+", "guided_choice": ["x"]}, 400, "guided_choice"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "messages[0].content[0].type"),
        ({"messages": MSG, "model": "gpt-4"}, 404, "model"),
    ],
)
def test_chat_bad_input(client, body, status, param):
    assert_error(client.post(CHAT, json=body), status, param)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], "mixed"]}, "prompt"),
        ({"prompt": [1, 10**9]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "echo": 1}, "echo"),
    ],
)
def test_completion_bad_input(client, body, param):
    assert_error(client.post(COMP, json=body), 400, param)


def test_transport_errors_are_enveloped(client):
    assert_error(client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(client.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(client.post(CHAT, content=b"", headers={"content-type": "application/json"}), 400)
    assert_error(client.get(CHAT), 405)
    assert_error(client.get("/v1/nothing-here"), 404)
    big = b'{"prompt": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    assert_error(client.post(COMP, content=big, headers={"content-type": "application/json"}), 413)


def test_bad_input_logs_no_traceback_and_serving_goes_on(client, caplog):
    with caplog.at_level(logging.INFO):
        for body in ({"messages": []}, {"messages": MSG, "n": -1}, {"prompt": []}):
            path = CHAT if "messages" in body else COMP
            assert client.post(path, json=body).status_code == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert chat(client).status_code == 200


# --------------------------------------------------------------------------- templates


def test_model_without_template_gets_a_400_that_says_how(tiny_model_factory):
    model = tiny_model_factory("LlamaForCausalLM", chat_template=None)
    with api_client(model) as c:
        err = assert_error(chat(c), 400, "messages")
        assert "--chat-template" in err["message"]
        assert c.post(COMP, json={"prompt": "still fine", "max_tokens": 2}).status_code == 200


def test_chat_template_flag_inline_and_file(tiny_model_factory, tmp_path):
    model = tiny_model_factory("LlamaForCausalLM", chat_template=None)
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    for flag in (template, str(path)):
        with api_client(model, chat_template=flag) as c:
            body = chat(c).json()
            expected = "[user] Tell me a story about a cat.\n[assistant] "
            assert body["usage"]["prompt_tokens"] == len(c.model.encode(expected, add_special_tokens=False))


# --------------------------------------------------------------------------- auth


def test_api_key_is_required_except_on_health_and_version(tiny_llama):
    with api_client(tiny_llama, api_key=("k1", "k2")) as c:
        err = assert_error(c.get("/v1/models"), 401)
        assert err["type"] == "authentication_error"
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.post(CHAT, json={"messages": MSG}, headers={"Authorization": "Basic k1"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.get("/health").status_code == 200
        assert c.get("/version").status_code == 200
