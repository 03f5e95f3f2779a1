"""Several models in one server (in-process): each its own engine, routing by ``model`` on every
endpoint, names echoed as the request gave them, per-model tokenizers, metrics and seeds."""

from __future__ import annotations

import re

import pytest

from apikit import assert_error, multi_client

NAMES = ["gen", "writer", "llama-embed", "enc", "cls", "rr"]


@pytest.fixture(scope="module")
def dirs(tiny_llama, tiny_encoder_factory):
    return {
        "llama": tiny_llama,
        "enc": tiny_encoder_factory("BertModel"),
        "cls": tiny_encoder_factory("BertForSequenceClassification", num_labels=3,
                                    id2label={0: "neg", 1: "neutral", 2: "pos"}),
        "rr": tiny_encoder_factory("BertForSequenceClassification", num_labels=1),
    }


@pytest.fixture(scope="module")
def c(dirs):
    with multi_client(
        {"model": dirs["llama"], "served_model_name": ("gen", "writer"), "max_num_seqs": 4},
        {"model": dirs["llama"], "served_model_name": ("llama-embed",), "convert": "embed"},
        {"model": dirs["enc"], "served_model_name": ("enc",)},
        {"model": dirs["cls"], "served_model_name": ("cls",)},
        {"model": dirs["rr"], "served_model_name": ("rr",)},
    ) as client:
        yield client


def test_every_name_of_every_model_is_listed(c, dirs):
    cards = c.get("/v1/models").json()["data"]
    assert [m["id"] for m in cards] == NAMES
    roots = {m["id"]: m["root"] for m in cards}
    assert roots["gen"] == roots["writer"] == roots["llama-embed"] == str(dirs["llama"])
    assert roots["enc"] == str(dirs["enc"]) and roots["rr"] == str(dirs["rr"])
    assert all(m["max_model_len"] == 256 for m in cards)
    assert c.get("/v1/models/writer").json()["id"] == "writer"
    assert_error(c.get("/v1/models/nope"), 404, "model")


def test_each_model_has_its_own_engine_and_config(c):
    models = c.serving.models
    assert len({id(m.engine) for m in models}) == len(models) == 5
    assert models[0].config.max_num_seqs == 4 and models[1].config.max_num_seqs == 256
    assert [m.tasks for m in models] == [["generate"], ["embed", "score"], ["embed", "score"],
                                         ["classify", "score"], ["classify", "score"]]


def test_the_named_model_answers_and_the_name_is_echoed(c):
    for name in ("gen", "writer"):
        r = c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name and r.json()["usage"]["completion_tokens"] == 3
        r = c.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == name
    for name in ("llama-embed", "enc"):
        r = c.post("/v1/embeddings", json={"model": name, "input": ["a cat", "a dog"]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name and len(r.json()["data"]) == 2
    dims = {name: len(c.post("/v1/embeddings", json={"model": name, "input": "x"}).json()["data"][0]["embedding"])
            for name in ("llama-embed", "enc")}
    assert dims["llama-embed"] == c.serving.models[1].pooling.embedding_size
    assert dims["enc"] == c.serving.models[2].pooling.embedding_size
    r = c.post("/classify", json={"model": "cls", "input": "loved it"})
    assert r.status_code == 200 and r.json()["model"] == "cls" and r.json()["data"][0]["num_classes"] == 3
    r = c.post("/score", json={"model": "rr", "text_1": "cat?", "text_2": ["a cat", "a car"]})
    assert r.status_code == 200 and r.json()["model"] == "rr" and len(r.json()["data"]) == 2
    r = c.post("/v1/rerank", json={"model": "rr", "query": "cat?", "documents": ["a cat", "a car"]})
    assert r.status_code == 200 and r.json()["model"] == "rr"
    r = c.post("/score", json={"model": "enc", "text_1": "cat", "text_2": "a cat"})  # bi-encoder: cosine
    assert r.status_code == 200 and r.json()["model"] == "enc"


def test_no_model_with_several_is_a_400_listing_the_names(c):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/embeddings", {"input": "hi"}), ("/tokenize", {"prompt": "hi"}),
                       ("/detokenize", {"tokens": [1, 2]}), ("/classify", {"input": "hi"})):
        err = assert_error(c.post(path, json=body), 400, "model")
        assert err["code"] == "model_required"
        assert all(name in err["message"] for name in NAMES), err


def test_an_unknown_model_is_a_404_naming_it(c):
    err = assert_error(c.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404, "model")
    assert "`nope`" in err["message"] and "gen" in err["message"]
    assert_error(c.post("/v1/embeddings", json={"model": "nope", "input": "hi"}), 404, "model")


@pytest.mark.parametrize("path, body, model, can", [
    ("/v1/completions", {"prompt": "hi"}, "enc", "embed, score"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "cls", "classify, score"),
    ("/v1/embeddings", {"input": "hi"}, "writer", "generate"),
    ("/classify", {"input": "hi"}, "enc", "embed, score"),
    ("/score", {"text_1": "a", "text_2": "b"}, "gen", "generate"),
    ("/v1/rerank", {"query": "a", "documents": ["b"]}, "writer", "generate"),
    ("/pooling", {"input": "a"}, "gen", "generate"),
    ("/generative_scoring", {"query": "a", "items": ["b"], "label_token_ids": [1]}, "rr", "classify, score"),
])
def test_a_model_that_cannot_do_it_is_a_400_naming_what_it_can(c, path, body, model, can):
    err = assert_error(c.post(path, json={**body, "model": model}), 400, "model")
    first = {"writer": "gen"}.get(model, model)
    assert f"`{first}`" in err["message"] and f"it supports: {can}." in err["message"], err


def test_tokenize_and_detokenize_use_the_named_models_tokenizer(c):
    text = "Hello tokenizers of two kinds"
    by_name = {}
    for name, model in (("gen", c.serving.models[0]), ("enc", c.serving.models[2])):
        body = c.post("/tokenize", json={"model": name, "prompt": text, "add_special_tokens": False}).json()
        assert body["tokens"] == model.tokenizer.encode(text, add_special_tokens=False)
        by_name[name] = body["tokens"]
        back = c.post("/detokenize", json={"model": name, "tokens": body["tokens"]}).json()["prompt"]
        assert back == model.tokenizer.decode(body["tokens"])
    assert by_name["gen"] != by_name["enc"]


def test_metrics_keep_one_series_per_model_labelled_with_its_first_name(c):
    before = c.get("/metrics").text
    c.post("/v1/completions", json={"model": "writer", "prompt": "count", "max_tokens": 4, "ignore_eos": True})
    text = c.get("/metrics").text
    series = re.findall(r'^vllm:generation_tokens_total\{model_name="([^"]+)"\} ([\d.]+)', text, re.M)
    assert [name for name, _ in series] == ["gen", "llama-embed", "enc", "cls", "rr"]
    old = dict(re.findall(r'^vllm:generation_tokens_total\{model_name="([^"]+)"\} ([\d.]+)', before, re.M))
    new = dict(series)
    assert float(new["gen"]) == float(old["gen"]) + 4  # the alias counts for its model
    assert all(new[n] == old[n] for n in ("llama-embed", "enc", "cls", "rr"))
    assert c.get("/health").status_code == 200


def test_health_is_503_when_any_engine_dies(dirs):
    with multi_client({"model": dirs["llama"], "served_model_name": ("a",)},
                      {"model": dirs["enc"], "served_model_name": ("b",)}) as client:
        assert client.get("/health").status_code == 200
        client.serving.models[1].engine.dead = "the engine stopped: test"
        err = assert_error(client.get("/health"), 503, None)
        assert "test" in err["message"]


def test_each_engine_draws_from_its_own_seeded_generator(dirs):
    """Two copies of one model with the same --seed draw the same unseeded tokens, whatever the other
    did in between; a different seed draws differently."""
    body = {"prompt": "Once upon", "max_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    with multi_client({"model": dirs["llama"], "served_model_name": ("a",), "seed": 7},
                      {"model": dirs["llama"], "served_model_name": ("b",), "seed": 7},
                      {"model": dirs["llama"], "served_model_name": ("c",), "seed": 8}) as client:
        def draw(name):
            r = client.post("/v1/completions", json={**body, "model": name})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        first_a, second_a = draw("a"), draw("a")
        assert first_a != second_a  # the generator moves on
        assert draw("b") == first_a and draw("b") == second_a
        assert draw("c") != first_a


# --------------------------------------------------------------------------- memory across models


def _fake(max_model_len: int = 256, kind=None, device: str = "cpu"):
    """What kv_budgets reads of a loaded model: one KV block of 16 tokens is 2 x 2 x 16 x 2 x 8 x 4 = 4 KiB."""
    import torch
    from types import SimpleNamespace

    from patchbay.model import GenerativeModel, KVLayout

    model = SimpleNamespace(kv_layout=KVLayout(num_layers=2, num_kv_heads=2, head_dim=8))
    return SimpleNamespace(kind=kind or GenerativeModel, device=torch.device(device), dtype=torch.float32,
                           model=model, max_model_len=max_model_len)


def test_kv_budgets_share_the_default_total(monkeypatch):
    from patchbay import budget
    from patchbay.config import ServerConfig
    from patchbay.model import PoolingModel

    kib = 1024
    monkeypatch.setattr(budget, "DEFAULT_CPU_KV_BYTES", 1000 * kib)
    small = ServerConfig(max_num_seqs=4)        # needs 4 x 16 blocks x 4 KiB = 256 KiB
    big = ServerConfig(max_num_seqs=64)         # needs 4 MiB
    given = ServerConfig(max_num_seqs=64, kv_cache_memory=300 * kib)
    # one model: what it needs, capped at the total (the single-model default)
    assert budget.kv_budgets([(small, _fake())])[0].nbytes == 256 * kib
    assert budget.kv_budgets([(big, _fake())])[0].nbytes == 1000 * kib
    # a model that needs little gets it; the rest goes to the one that needs more
    out = budget.kv_budgets([(big, _fake()), (small, _fake())])
    assert [b.nbytes for b in out] == [744 * kib, 256 * kib]
    assert out[1].how.startswith("what max-num-seqs") and "what is left of" in out[0].how
    # two that need more split it evenly, after a model that says its own size; encoders keep none
    out = budget.kv_budgets([(big, _fake()), (given, _fake()), (big, _fake()), (ServerConfig(), _fake(kind=PoolingModel))])
    assert out[1].nbytes == 300 * kib and out[1].how == "kv-cache-memory"
    assert out[0].nbytes == out[2].nbytes == 350 * kib and "1/2 share" in out[0].how and out[3] is None
    assert "after the models that set kv-cache-memory" in out[0].how


def test_a_share_too_small_for_one_sequence_stops_startup_naming_the_model(dirs, monkeypatch):
    from patchbay import budget
    from patchbay.config import ConfigError

    monkeypatch.setattr(budget, "DEFAULT_CPU_KV_BYTES", 3 * 1024**2)
    with pytest.raises(ConfigError, match=r"models\[1\] \(b, .*\): --kv-cache-memory: .*fewer than one sequence"):
        with multi_client({"model": dirs["llama"], "served_model_name": ("a",), "kv_cache_memory": 3 * 1024**2},
                          {"model": dirs["llama"], "served_model_name": ("b",)}):
            pass


def test_memory_is_reported_at_startup(dirs, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="patchbay.budget")
    with multi_client({"model": dirs["llama"], "served_model_name": ("a",), "kv_cache_memory": 2 * 1024**2},
                      {"model": dirs["enc"], "served_model_name": ("b",)}, max_num_seqs=2) as client:
        blocks = client.serving.models[0].engine.scheduler.blocks.num_blocks
    lines = [r.getMessage() for r in caplog.records if r.name == "patchbay.budget"]
    assert any(line.startswith("memory of 'a' on cpu: weights ") and f"KV cache 2.0 MiB = {blocks} blocks of 16 "
               "tokens" in line and "kv-cache-memory" in line for line in lines), lines
    assert any(line.startswith("memory of 'b' on cpu") and "no KV cache" in line for line in lines), lines
    assert any(line.startswith("memory of 2 models: weights ") for line in lines), lines
