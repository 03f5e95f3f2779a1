"""``serve --config FILE.yaml`` as a real process: several models served side by side through the
official openai client, and every mistake a file can hold stopping start-up with its name."""

from __future__ import annotations

import json
import re
import textwrap

import httpx
import openai
import pytest

from serverkit import run_serve, serve

pytestmark = pytest.mark.e2e

KEY = "sk-multi"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_llama, tiny_encoder_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    classifier = tiny_encoder_factory("BertForSequenceClassification", num_labels=3)
    (tmp / "serve.yaml").write_text(textwrap.dedent(f"""
        port: 1                 # the command line's --port wins
        api-key: {KEY}
        max-model-len: 128
        cpu-threads: 1
        max-num-seqs: 4
        models:
          - model: {tiny_llama}
            served-model-name: [tiny, tiny-alias]
            max-model-len: 256
          - model: {tiny_llama}
            served-model-name: tiny-embed
            convert: embed
          - model: {classifier}
            served-model-name: sentiment
    """))
    with serve(["--config", str(tmp / "serve.yaml")], tmp) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_every_model_answers_under_its_names(server, client, tiny_llama):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == ["tiny", "tiny-alias", "tiny-embed", "sentiment"]
    assert cards["tiny"].root == str(tiny_llama) and cards["tiny"].max_model_len == 256
    assert cards["tiny-embed"].max_model_len == 128  # the top level's, under the entry's own
    for name in ("tiny", "tiny-alias"):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.model == name and r.usage.completion_tokens >= 1
    stream = client.completions.create(model="tiny-alias", prompt="The sea", max_tokens=5, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = [c for c in stream]
    assert {c.model for c in chunks} == {"tiny-alias"} and "".join(c.choices[0].text for c in chunks if c.choices)
    emb = client.embeddings.create(model="tiny-embed", input=["a cat", "a dog"])
    assert emb.model == "tiny-embed" and len(emb.data) == 2
    r = httpx.post(server.url + "/classify", headers=AUTH, json={"model": "sentiment", "input": "great"}, timeout=30)
    assert r.status_code == 200 and r.json()["data"][0]["num_classes"] == 3


def test_routing_errors_come_in_the_envelope(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert info.value.body["param"] == "model" and "`nope`" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="tiny", input="hi")
    assert info.value.body["param"] == "model" and "it supports: generate." in info.value.body["message"]
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "tiny, tiny-alias, tiny-embed, sentiment" in r.json()["error"]["message"]


def test_metrics_health_and_the_startup_report(server):
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    names = re.findall(r'^vllm:num_requests_running\{model_name="([^"]+)"\}', text, re.M)
    assert names == ["tiny", "tiny-embed", "sentiment"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    log = server.output()
    assert "memory of 'tiny' on cpu: weights" in log and "memory of 'sentiment' on cpu" in log
    assert "memory of 3 models" in log


# --------------------------------------------------------------------------- start-up mistakes


def startup_error(tmp_path, text: str, *argv: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    out = run_serve(["--config", str(path), *argv])
    assert out.returncode != 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out.stderr


def test_mistakes_stop_startup_naming_them(tmp_path, tiny_llama):
    m = str(tiny_llama)
    cases = [
        (f"models:\n  - model: {m}\n    max-num-seqz: 2\n", (), "models[0].max-num-seqz: unknown key"),
        (f"models:\n  - model: {m}\n    host: 0.0.0.0\n", (), "models[0].host: 'host' is server-wide"),
        (f"models:\n  - model: {m}\n  - served-model-name: x\n", (), "models[1]: has no 'model'"),
        (f"models:\n  - model: {m}\n    served-model-name: a\n  - model: {m}\n    served-model-name: [b, a]\n",
         (), "the served name 'a' is used by models[0] and models[1]"),
        (f"models:\n  - model: {m}\n", (m,), "cannot stand together with a MODEL argument"),
        (f"model: {m}\nmodels:\n  - model: {m}\n", (), "cannot stand together with a top-level 'model'"),
    ]
    for text, argv, message in cases:
        assert message in startup_error(tmp_path, text, *argv)


def test_a_missing_directory_or_an_unknown_architecture_stops_startup(tmp_path, tiny_llama):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    text = f"models:\n  - model: {tiny_llama}\n    served-model-name: a\n  - model: {tmp_path}/gone\n"
    err = startup_error(tmp_path, text)
    assert f"models[1] ({tmp_path}/gone" in err and "is not a local Hugging Face model directory" in err
    err = startup_error(tmp_path, f"models:\n  - model: {tiny_llama}\n    served-model-name: a\n  - model: {odd}\n"
                                  f"    served-model-name: odd\n")
    assert "models[1] (odd," in err and "no loaded model family runs ['NoSuchForCausalLM']" in err
