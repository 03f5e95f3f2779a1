"""/v1/completions with ``echo``: scoring a prompt with ``max_tokens: 0``, and ``text_offset`` as one running
count over the token strings (as vLLM and OpenAI's legacy API give them)."""

from __future__ import annotations

import itertools

import pytest

from apikit import api_client, assert_error, sse_events

COMP = "/v1/completions"
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama) as c:
        yield c


def running(tokens: list[str]) -> list[int]:
    return [0, *itertools.accumulate(len(t) for t in tokens)][: len(tokens)]


def test_max_tokens_0_with_echo_scores_the_prompt(client):
    prompt_len = len(client.model.encode(PROMPT))
    body = client.post(COMP, json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    (choice,) = body["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == prompt_len and lp["token_logprobs"][0] is None
    assert all(v is not None and v <= 0 for v in lp["token_logprobs"][1:])
    assert lp["text_offset"] == running(lp["tokens"])
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 0, "total_tokens": prompt_len}
    # the same numbers as vLLM's prompt_logprobs of a normal request
    ref = client.post(COMP, json={"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 0}).json()
    ids = client.model.encode(PROMPT)
    plp = ref["choices"][0]["prompt_logprobs"]
    for i in range(1, prompt_len):
        assert abs(plp[i][str(ids[i])]["logprob"] - lp["token_logprobs"][i]) < 1e-5


def test_max_tokens_0_streams_the_prompt_only(client):
    r = client.post(COMP, json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0, "stream": True,
                                "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 0


def test_max_tokens_0_without_echo_is_refused(client):
    assert_error(client.post(COMP, json={"prompt": PROMPT, "max_tokens": 0}), 400, "max_tokens")
    assert_error(client.post(COMP, json={"prompt": PROMPT, "max_tokens": -1, "echo": True}), 400, "max_tokens")


@pytest.mark.parametrize("echo", [True, False])
def test_text_offset_is_one_running_count(client, echo):
    req = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2, "echo": echo}
    lp = client.post(COMP, json=req).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 6 + (len(client.model.encode(PROMPT)) if echo else 0)
    assert lp["text_offset"] == running(lp["tokens"])
    # streamed: the chunks' offsets go on where the previous chunk left off
    events = sse_events(client.post(COMP, json={**req, "stream": True}).text)
    tokens, offsets = [], []
    for e in events[:-1]:
        for c in e["choices"]:
            if c["logprobs"]:
                tokens += c["logprobs"]["tokens"]
                offsets += c["logprobs"]["text_offset"]
    assert tokens == lp["tokens"] and offsets == lp["text_offset"]
