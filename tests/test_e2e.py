"""A real ``serve`` process driven by the official openai client, sync and async, streaming and not."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from serverkit import serve

pytestmark = pytest.mark.e2e

KEY = "sk-test-123"
MSG = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = [str(tiny_llama), "--served-model-name", "tiny", "--max-model-len", "512", "--api-key", KEY]
    with serve(args, tmp_path_factory.mktemp("e2e")) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_sync(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model="tiny", messages=MSG, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full
    assert usage.completion_tokens == 10 and finish == "length"


def test_completions_sync_and_stream(client):
    r = client.completions.create(model="tiny", prompt="The sea is", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True, "top_k": 5})
    text = r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The sea is", max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == text


def test_async_client_concurrent_streams(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def one(i):
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=12,
                temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def one_plain(i):
            r = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=12,
                temperature=0, extra_body={"ignore_eos": True})
            return r.choices[0].message.content

        streamed = await asyncio.gather(*(one(i) for i in range(8)))
        plain = await asyncio.gather(*(one_plain(i) for i in range(8)))
        await client.close()
        return streamed, plain

    streamed, plain = asyncio.run(main())
    assert streamed == plain


def test_errors_reach_the_client_typed(client, server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=MSG, temperature=-1)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert exc.value.body["param"] == "model"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    assert r.choices[0].message.content is not None
    assert "Traceback" not in server.output()


def _wait_idle(server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics(KEY)
        if m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"engine still busy: {server.metrics(KEY)}")


def test_client_disconnect_aborts_and_returns_blocks(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "messages": MSG, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers) as r:
            lines = 0
            for _ in r.iter_lines():
                lines += 1
                if lines > 6:
                    break
    m = _wait_idle(server)
    assert m["kv_cache_usage_perc"] == 0.0
    assert m["generation_tokens_total"] < 10_000
    # a non-streaming request whose client gives up is aborted too
    # (16 x 500 tokens take the tiny model ~0.4 s on this machine's fast cores, 4x the client's wait;
    # every one of the n sequences must stop)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 500, "n": 16, "ignore_eos": True}
    before = server.metrics(KEY)["generation_tokens_total"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=0.1)
    m = _wait_idle(server)
    assert m["kv_cache_usage_perc"] == 0.0
    assert m["generation_tokens_total"] - before < 16 * 500


def test_openai_client_parameters_and_extra_body(client):
    r = client.completions.create(model="tiny", prompt="The sea", max_tokens=4, temperature=0, logprobs=2,
                                  echo=True, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("The sea") and lp.token_logprobs[0] is None
    assert all(t.startswith("token_id:") for t in lp.tokens)
    chat = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
        logit_bias={"9": 100}, presence_penalty=0.0, frequency_penalty=0.1, seed=3, n=2, user="someone",
        extra_body={"min_tokens": 2, "repetition_penalty": 1.1, "top_k": 5, "min_p": 0.01,
                    "skip_special_tokens": True, "cache_salt": "abc",
                    "logits_processors": [{"qualname": "patchbay.no_repeat_ngram", "args": [3]}]},
    )
    assert len(chat.choices) == 2
    tokens = [c.token for c in chat.choices[0].logprobs.content]
    # the bias forces token 9; the no-repeat-3-gram processor forbids a third "9 9 9" run
    assert tokens[:3] == [tokens[0]] * 3 and tokens[3] != tokens[0]
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3
    beams = client.completions.create(model="tiny", prompt="The sea", max_tokens=3, n=2,
                                      extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert len(beams.choices) == 2
    best = client.completions.create(model="tiny", prompt="The sea", max_tokens=3, n=1, best_of=3, seed=1)
    assert len(best.choices) == 1
    stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, temperature=0, stream=True,
                                            logprobs=True, top_logprobs=1)
    got = [c.choices[0].logprobs.content for c in stream if c.choices and c.choices[0].logprobs]
    assert sum(len(x) for x in got) == 3
    tok = httpx.post(str(client.base_url).removesuffix("/v1/") + "/tokenize", json={"prompt": "hello"},
                     headers={"Authorization": f"Bearer {KEY}"}).json()
    assert tok["count"] == len(tok["tokens"])


def test_chat_completions_parse_with_a_nested_pydantic_model(client):
    from typing import Annotated, Literal, Optional

    from pydantic import BaseModel, Field, StringConstraints

    class Address(BaseModel):
        city: Literal["Paris", "Rome", "Oslo"]
        zip: Annotated[str, StringConstraints(pattern=r"^[0-9]{4}$")]

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        name: Annotated[str, StringConstraints(max_length=5)]

    class Person(BaseModel):
        name: Annotated[str, StringConstraints(max_length=6)]
        home: Address
        pet: Optional[Pet]
        tags: list[Literal["x", "y"]] = Field(max_length=2)

    finished = 0
    for seed in range(4):
        try:
            r = client.chat.completions.parse(model="tiny", messages=MSG, response_format=Person, max_tokens=150,
                                              temperature=1.0, seed=seed)
        except openai.LengthFinishReasonError:
            continue
        person = r.choices[0].message.parsed
        assert isinstance(person, Person) and isinstance(person.home, Address)
        finished += 1
    assert finished >= 1
    for backend in ("outlines", "lm-format-enforcer"):
        r = client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=40, temperature=0,
            extra_body={"guided_choice": ["red", "green"], "guided_decoding_backend": backend})
        assert r.choices[0].message.content in ("red", "green")


def test_first_start_builds_the_demo_model_and_serves_it(tmp_path):
    """No model and an empty cache: serve builds the demo model (in a child process: torch's
    OpenMP pool does not survive the fork into Granian's worker, which then hung) and answers."""
    env = {"PATCHBAY_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    with serve([], tmp_path, env=env, startup_timeout=150) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        out = client.completions.create(model="patchbay-demo", prompt="hello", max_tokens=4)
        assert out.choices[0].finish_reason in ("stop", "length")
    assert list((tmp_path / "cache" / "models").glob("demo-*/config.json"))


def test_the_main_process_never_imports_torch(server):
    # the start-up checks ran in a forked child (cli.preflight_apart): Granian's supervisor, up for the
    # server's whole life, holds neither torch nor the plugins (it was ~250 MB resident, now ~30)
    maps = open(f"/proc/{server.proc.pid}/maps").read()
    assert "libtorch" not in maps
    rss_kb = int(open(f"/proc/{server.proc.pid}/status").read().split("VmRSS:")[1].split()[0])
    assert rss_kb < 100_000
