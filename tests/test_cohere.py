"""Cohere's embed API (/v1/embed, /v2/embed) in-process: response types, Cohere's packing of every
embedding type, truncation, input types and Matryoshka sizes; bad input named in a 400."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apikit import api_client, assert_error

TEXTS = ["the river runs to the sea", "a cat sat on the mat", "x"]
LONG = " ".join(["river"] * 400)


@pytest.fixture(scope="module")
def model_dir(tiny_encoder_factory, tmp_path_factory):
    """A tiny sentence-transformers embedder with prompt prefixes, marked Matryoshka."""
    src = tiny_encoder_factory("BertModel", sentence_transformers=True, matryoshka_dimensions=[16, 32, 64])
    dst = tmp_path_factory.mktemp("cohere") / "model"
    shutil.copytree(src, dst)
    cfg = dst / "config_sentence_transformers.json"
    data = json.loads(cfg.read_text())
    data["prompts"] = {"search_query": "query: ", "search_document": "passage: ", "custom": "custom: "}
    cfg.write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="module")
def client(model_dir):
    with api_client(model_dir) as c:
        yield c


def openai_vectors(client, texts, **extra) -> np.ndarray:
    r = client.post("/v1/embeddings", json={"input": texts, **extra})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def ok(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_v1_floats_and_by_type(client):
    ref = openai_vectors(client, TEXTS)
    body = ok(client, "/v1/embed", {"texts": TEXTS, "model": "tiny", "input_type": "classification"})
    assert body["response_type"] == "embeddings_floats" and body["texts"] == TEXTS and body["id"]
    assert np.allclose(body["embeddings"], ref, atol=1e-6)
    tokens = sum(len(client.model.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert body["meta"]["api_version"]["version"] == "1"
    assert body["meta"]["billed_units"]["input_tokens"] == tokens == body["meta"]["tokens"]["input_tokens"]
    typed = ok(client, "/v1/embed", {"texts": TEXTS, "embedding_types": ["float", "int8"]})
    assert typed["response_type"] == "embeddings_by_type" and set(typed["embeddings"]) == {"float", "int8"}
    assert np.allclose(typed["embeddings"]["float"], ref, atol=1e-6)


def test_v2_every_embedding_type_packed_as_cohere_does(client):
    from sentence_transformers.util.quantization import quantize_embeddings

    ref = openai_vectors(client, TEXTS)
    kinds = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    body = ok(client, "/v2/embed", {"model": "tiny", "texts": TEXTS, "input_type": "classification",
                                    "embedding_types": kinds})
    assert body["response_type"] == "embeddings_by_type" and body["texts"] == TEXTS
    assert body["meta"]["api_version"]["version"] == "2"
    emb = body["embeddings"]
    assert set(emb) == set(kinds)
    assert np.allclose(emb["float"], ref, atol=1e-6)
    int8 = np.clip(np.rint(ref * 127), -128, 127)
    assert np.array_equal(np.array(emb["int8"]), int8)
    assert np.array_equal(np.array(emb["uint8"]), np.array(emb["int8"]) + 128)
    assert np.array(emb["int8"]).min() >= -128 and np.array(emb["uint8"]).max() <= 255
    assert np.array_equal(np.array(emb["binary"]), quantize_embeddings(ref, "binary").astype(np.int64))
    assert np.array_equal(np.array(emb["ubinary"]), quantize_embeddings(ref, "ubinary").astype(np.int64))
    assert len(emb["binary"][0]) == ref.shape[1] // 8
    for s, row in zip(emb["base64"], ref):
        assert np.array_equal(np.frombuffer(base64.b64decode(s), dtype="<f4"), row)
    default = ok(client, "/v2/embed", {"texts": TEXTS[:1]})
    assert set(default["embeddings"]) == {"float"}


def test_v2_inputs_text_parts(client):
    body = ok(client, "/v2/embed", {"inputs": [{"content": [{"type": "text", "text": "a river"},
                                                           {"type": "text", "text": "to the sea"}]}],
                                    "embedding_types": ["float"]})
    assert "texts" not in body
    assert np.allclose(body["embeddings"]["float"], openai_vectors(client, ["a river\nto the sea"]), atol=1e-6)
    assert_error(client.post("/v2/embed", json={"inputs": [{"content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,AA=="}}]}]}), 400, "inputs[0].content[0]")


def test_input_type_uses_the_models_prompts(client):
    q = ok(client, "/v2/embed", {"texts": TEXTS, "input_type": "search_query", "embedding_types": ["float"]})
    assert np.allclose(q["embeddings"]["float"], openai_vectors(client, ["query: " + t for t in TEXTS]), atol=1e-6)
    d = ok(client, "/v1/embed", {"texts": TEXTS, "input_type": "search_document"})
    assert np.allclose(d["embeddings"], openai_vectors(client, ["passage: " + t for t in TEXTS]), atol=1e-6)
    c = ok(client, "/v2/embed", {"texts": TEXTS, "input_type": "custom"})
    assert np.allclose(c["embeddings"]["float"], openai_vectors(client, ["custom: " + t for t in TEXTS]), atol=1e-6)
    plain = ok(client, "/v2/embed", {"texts": TEXTS, "input_type": "clustering"})  # Cohere's type, no prompt here
    assert np.allclose(plain["embeddings"]["float"], openai_vectors(client, TEXTS), atol=1e-6)
    assert_error(client.post("/v2/embed", json={"texts": TEXTS, "input_type": "poetry"}), 400, "input_type")
    assert_error(client.post("/v2/embed", json={"texts": TEXTS, "input_type": "image"}), 400, "input_type")


def test_truncation_and_max_tokens(client):
    tok = client.model.tokenizer
    ids = tok(LONG)["input_ids"]
    end = ok(client, "/v2/embed", {"texts": [LONG], "truncate": "END"})
    assert end["meta"]["tokens"]["input_tokens"] == 256
    assert np.allclose(end["embeddings"]["float"], openai_vectors(client, [ids[:255] + ids[-1:]]), atol=1e-6)
    start = ok(client, "/v2/embed", {"texts": [LONG], "truncate": "START"})
    assert np.allclose(start["embeddings"]["float"], openai_vectors(client, [ids[:1] + ids[-255:]]), atol=1e-6)
    assert ok(client, "/v1/embed", {"texts": [LONG]})["meta"]["tokens"]["input_tokens"] == 256  # END by default
    short = ok(client, "/v2/embed", {"texts": [TEXTS[0]], "max_tokens": 4})
    t = tok(TEXTS[0])["input_ids"]
    assert np.allclose(short["embeddings"]["float"], openai_vectors(client, [t[:3] + t[-1:]]), atol=1e-6)
    err = assert_error(client.post("/v2/embed", json={"texts": ["ok", LONG], "truncate": "NONE"}), 400, "texts[1]")
    assert "256" in err["message"]
    assert_error(client.post("/v1/embed", json={"texts": [LONG], "truncate": "NONE"}), 400, "texts[0]")
    assert_error(client.post("/v2/embed", json={"texts": [TEXTS[0]], "truncate": "NONE", "max_tokens": 3}), 400,
                 "texts[0]", contains="max_tokens")
    assert_error(client.post("/v2/embed", json={"texts": ["a"], "truncate": "MIDDLE"}), 400, "truncate")
    assert_error(client.post("/v2/embed", json={"texts": ["a"], "max_tokens": 0}), 400, "max_tokens")
    assert_error(client.post("/v2/embed", json={"texts": ["a"], "max_tokens": 2}), 400, "max_tokens")


def test_output_dimension_is_matryoshka(client):
    full = torch.tensor(openai_vectors(client, TEXTS[:1])[0])
    body = ok(client, "/v2/embed", {"texts": TEXTS[:1], "output_dimension": 32, "embedding_types": ["float", "binary"]})
    cut = torch.tensor(body["embeddings"]["float"][0])
    torch.testing.assert_close(cut, F.normalize(full[:32], dim=-1), atol=1e-6, rtol=1e-5)
    assert len(body["embeddings"]["binary"][0]) == 4
    assert_error(client.post("/v2/embed", json={"texts": ["a"], "output_dimension": 48}), 400, "output_dimension")
    assert_error(client.post("/v2/embed", json={"texts": ["a"], "output_dimension": 65}), 400, "output_dimension")


def test_bad_requests_name_the_field(client):
    post = lambda path, b: client.post(path, json=b)  # noqa: E731
    assert_error(post("/v2/embed", {"texts": ["a"], "embedding_types": ["float", "int4"]}), 400, "embedding_types[1]")
    assert_error(post("/v1/embed", {"texts": ["a"], "embedding_types": ["bits"]}), 400, "embedding_types[0]")
    assert_error(post("/v2/embed", {"texts": ["a"], "embedding_types": []}), 400, "embedding_types")
    assert_error(post("/v2/embed", {"texts": []}), 400, "texts")
    assert_error(post("/v1/embed", {"texts": []}), 400, "texts")
    assert_error(post("/v1/embed", {}), 400, "texts")
    assert_error(post("/v2/embed", {"texts": ["a", ""]}), 400, "texts[1]")
    assert_error(post("/v2/embed", {"images": ["data:image/png;base64,AA=="]}), 400, "images")
    assert_error(post("/v2/embed", {"texts": ["a"], "model": "embed-v4.0"}), 404, "model")
    assert_error(post("/v2/embed", {"texts": ["a"], "priority": 3}), 400, "priority")
    assert_error(post("/v2/embed", {"texts": ["a"], "truncate": "END", "extra": 1}), 400, "extra")
    assert ok(client, "/v2/embed", {"texts": ["a"], "priority": None, "truncate": None, "max_tokens": None})


def test_binary_needs_a_size_divisible_by_eight(tiny_encoder_factory):
    with api_client(tiny_encoder_factory("BertModel", sentence_transformers=True, hidden_size=36, num_heads=4)) as c:
        assert_error(c.post("/v2/embed", json={"texts": ["a"], "embedding_types": ["ubinary"]}), 400,
                     "embedding_types")
        assert ok(c, "/v2/embed", {"texts": ["a"], "embedding_types": ["int8"]})
