"""Logits-processor plugins: builtin ones, a third-party package, vllm_xargs, and the safety rule."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from apikit import api_client, assert_error
from enginekit import build_serving, collect
from patchbay import hookimpl
from patchbay.engine.params import SamplingParams
from patchbay.logits import LogitsProcessor
from patchbay.registry import LogitsProcessorSpec

COMP = "/v1/completions"
ROOT = Path(__file__).resolve().parent.parent


def ids(client, **body) -> list[int]:
    body = {"prompt": "Numbers and words", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True, **body}
    r = client.post(COMP, json=body)
    assert r.status_code == 200, r.text
    return [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


class Recorder(LogitsProcessor):
    """Bans the token named in the request's vllm_xargs; records what it saw."""

    seen: list = []

    def __init__(self, *, context):
        self.ban = int(context["extra_args"].get("ban", -1))

    @classmethod
    def apply_batch(cls, instances, output_ids, prompt_ids, logits):
        cls.seen.append((len(instances), [len(o) for o in output_ids]))
        for row, inst in enumerate(instances):
            if inst.ban >= 0:
                logits[row, inst.ban] = float("-inf")


class RecorderPlugin:
    @hookimpl
    def register_logits_processors(self, register):
        register(LogitsProcessorSpec("tests.Recorder", Recorder))


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama, extra_plugins=[("recorder", RecorderPlugin())]) as c:
        yield c


def test_no_repeat_ngram(client):
    plain = ids(client, max_tokens=24)
    got = ids(client, max_tokens=24, logits_processors=[{"qualname": "patchbay.no_repeat_ngram", "args": [2]}])
    prompt = client.model.encode("Numbers and words")
    seq = prompt + got
    grams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
    assert len(grams) == len(set(grams))
    assert got != plain


def test_length_limit_forces_eos(client):
    r = client.post(COMP, json={"prompt": "x", "max_tokens": 20, "temperature": 0,
                                "logits_processors": [{"qualname": "patchbay.length_limit", "args": [4]}]}).json()
    assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "stop"


def test_force_prefix(client):
    forced = client.model.encode(" the river", add_special_tokens=False)
    got = ids(client, logits_processors=[{"qualname": "patchbay.force_prefix", "kwargs": {"token_ids": forced}}])
    assert got[: len(forced)] == forced
    text = client.post(COMP, json={"prompt": "x", "max_tokens": 6, "temperature": 0, "logits_processors": [
        {"qualname": "patchbay.force_prefix", "kwargs": {"text": " the river"}}]}).json()["choices"][0]["text"]
    assert text.startswith(" the river")


def test_unknown_qualnames_are_refused_and_list_the_available(client):
    err = assert_error(client.post(COMP, json={"prompt": "x", "logits_processors": ["os.system"]}), 400,
                       "logits_processors[0]")
    assert "patchbay.no_repeat_ngram" in err["message"] and "tests.Recorder" in err["message"]
    assert_error(client.post(COMP, json={"prompt": "x", "logits_processors": [
        {"qualname": "patchbay.no_repeat_ngram", "args": [-1]}]}), 400, "logits_processors[0]")
    assert_error(client.post(COMP, json={"prompt": "x", "logits_processors": [{"qualname": 5}]}), 400,
                 "logits_processors[0]")


def test_vllm_xargs_reach_processors_which_run_batched(client):
    plain = ids(client)
    got = ids(client, logits_processors=["tests.Recorder"], vllm_xargs={"ban": plain[0]})
    assert got[0] != plain[0] and plain[0] not in got
    Recorder.seen.clear()
    body = {"prompt": ["a b c", "d e f", "g h i"], "max_tokens": 4, "temperature": 0,
            "logits_processors": ["tests.Recorder"]}
    assert client.post(COMP, json=body).status_code == 200
    assert max(n for n, _ in Recorder.seen) > 1, "rows of one processor class share one call"


def test_processors_batched_in_the_engine(tiny_llama):
    """Two sequences with different processors and one without, in one engine batch."""
    serving = build_serving(tiny_llama)
    serving.start()
    try:
        prompt = serving.encode("Numbers and words")
        ban = Recorder(context={"extra_args": {"ban": 7}})
        params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logits_processors=(ban,)),
                  SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={7: 100.0}),
                  SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)]

        async def main():
            return await asyncio.gather(*(collect(serving.engine, f"r{i}", prompt, p) for i, p in enumerate(params)))

        banned, forced, plain = asyncio.run(main())
        assert 7 not in banned.token_ids and forced.token_ids == [7] * 6 and plain.token_ids != forced.token_ids
    finally:
        serving.stop()


def test_contrib_package_installed_and_used(tmp_path, tiny_llama, monkeypatch):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(ROOT / "contrib" / "patchbay-nodigits")],
                   check=True, capture_output=True, text=True)
    monkeypatch.syspath_prepend(str(target))
    with api_client(tiny_llama) as c:
        digits = [i for i in range(len(c.model.tokenizer)) if re.search(r"\d", c.model.tokenizer.decode([i]))]
        assert digits, "the tiny tokenizer has digit tokens"
        bias = {str(t): 5.0 for t in digits}
        plain = ids(c, logit_bias=bias)
        assert set(plain) & set(digits), "with the bias, digits would be generated"
        got = ids(c, logit_bias=bias, logits_processors=["nodigits.NoDigits"])
        assert not set(got) & set(digits)
        keep7 = ids(c, logit_bias=bias, logits_processors=[{"qualname": "nodigits.NoDigits", "kwargs": {"keep": "7"}}])
        assert all("7" in c.model.tokenizer.decode([t]) or t not in digits for t in keep7)
