"""/score, /rerank (Jina, Cohere v1 and v2 shapes) and /generative_scoring in-process, against
transformers' own forward of the same tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apikit import api_client, assert_error

QUERY = "what is the capital of france"
DOCS = ["the capital of brazil is brasilia", "the capital of france is paris", "horses and cows are animals",
        "paris is a city in france"]
LONG_DOC = " ".join(["the river runs to the sea"] * 60)  # well over 256 tokens


@pytest.fixture(scope="module")
def cross_dir(tiny_encoder_factory):
    return tiny_encoder_factory("BertForSequenceClassification", num_labels=1)


@pytest.fixture(scope="module")
def cross(cross_dir):
    with api_client(cross_dir) as c:
        yield c


@pytest.fixture(scope="module")
def hf_scores(cross_dir):
    """transformers' logits for pairs, then sigmoid (what sentence-transformers' CrossEncoder gives)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(cross_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(cross_dir)

    def scores(firsts, seconds, **tok_kwargs):
        with torch.inference_mode():
            enc = tok(firsts, seconds, padding=True, return_tensors="pt", **tok_kwargs)
            return torch.sigmoid(model(**enc).logits[:, 0]).tolist()

    return scores


def post_ok(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- /score


def test_score_one_to_one_one_to_many_many_to_many(cross, hf_scores):
    one = post_ok(cross, "/score", {"text_1": QUERY, "text_2": DOCS[1], "encoding_format": "float"})
    assert one["id"].startswith("score-") and one["object"] == "list" and one["model"] == "tiny"
    assert [d["object"] for d in one["data"]] == ["score"]
    assert one["data"][0]["score"] == pytest.approx(hf_scores([QUERY], [DOCS[1]])[0], abs=1e-5)
    many = post_ok(cross, "/v1/score", {"text_1": QUERY, "text_2": DOCS})
    ref = hf_scores([QUERY] * len(DOCS), DOCS)
    assert [d["index"] for d in many["data"]] == list(range(len(DOCS)))
    assert np.allclose([d["score"] for d in many["data"]], ref, atol=1e-5)
    listed_one = post_ok(cross, "/score", {"text_1": [QUERY], "text_2": DOCS})
    assert np.allclose([d["score"] for d in listed_one["data"]], ref, atol=1e-5)
    firsts = ["q one", "q two", "q three", "q four"]
    zipped = post_ok(cross, "/score", {"text_1": firsts, "text_2": DOCS})
    assert np.allclose([d["score"] for d in zipped["data"]], hf_scores(firsts, DOCS), atol=1e-5)
    tok = cross.model.tokenizer
    n = sum(len(tok(a, b)["input_ids"]) for a, b in zip(firsts, DOCS))
    assert zipped["usage"]["prompt_tokens"] == n == zipped["usage"]["total_tokens"]
    # the later spellings of the two sides
    alias = post_ok(cross, "/score", {"queries": firsts, "documents": DOCS})
    assert [d["score"] for d in alias["data"]] == [d["score"] for d in zipped["data"]]


def test_score_errors_name_the_field(cross):
    post = lambda b: cross.post("/score", json=b)  # noqa: E731
    err = assert_error(post({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}), 400, "text_2")
    assert "2" in err["message"] and "3" in err["message"]
    assert_error(post({"text_1": [], "text_2": ["c"]}), 400, "text_1")
    assert_error(post({"text_1": "a", "text_2": []}), 400, "text_2")
    assert_error(post({"text_1": "a"}), 400, "text_2")
    assert_error(post({"text_2": "a"}), 400, "text_1")
    assert_error(post({"text_1": "a", "text_2": "b", "queries": "c"}), 400)
    assert_error(post({"text_1": "a", "text_2": ["b", ""]}), 400, "text_2[1]")
    assert_error(post({"text_1": QUERY, "text_2": LONG_DOC}), 400, "text_2", contains="256")
    assert_error(post({"text_1": "a", "text_2": "b", "priority": 1}), 400, "priority")
    assert_error(post({"text_1": "a", "text_2": "b", "encoding_format": "hex"}), 400, "encoding_format")
    # truncate_prompt_tokens cuts the pair (longest side first) instead
    cut = post_ok(cross, "/score", {"text_1": QUERY, "text_2": LONG_DOC, "truncate_prompt_tokens": 64})
    assert cut["usage"]["prompt_tokens"] == 64


def test_cross_encoder_with_several_labels_cannot_score(tiny_encoder_factory):
    with api_client(tiny_encoder_factory("BertForSequenceClassification", num_labels=3)) as c:
        assert_error(c.post("/score", json={"text_1": "a", "text_2": "b"}), 400, "model", contains="/classify")


def test_bi_encoder_score_is_the_cosine_of_embeddings(tiny_encoder_factory):
    with api_client(tiny_encoder_factory("BertModel", sentence_transformers=True)) as c:
        body = post_ok(c, "/score", {"text_1": QUERY, "text_2": DOCS[:3]})
        emb = np.array([d["embedding"] for d in post_ok(c, "/v1/embeddings", {"input": [QUERY] + DOCS[:3]})["data"]])
        cos = emb[1:] @ emb[0] / np.linalg.norm(emb[1:], axis=1) / np.linalg.norm(emb[0])
        assert np.allclose([d["score"] for d in body["data"]], cos, atol=1e-5)
        ranked = post_ok(c, "/rerank", {"query": QUERY, "documents": DOCS[:3]})
        assert [r["index"] for r in ranked["results"]] == list(np.argsort(-cos, kind="stable"))
        assert post_ok(c, "/rerank", {"query": QUERY, "documents": [LONG_DOC]})["results"]  # cut to fit


# --------------------------------------------------------------------------- rerank


def test_rerank_sorted_top_n_and_documents(cross, hf_scores):
    ref = hf_scores([QUERY] * len(DOCS), DOCS)
    body = post_ok(cross, "/rerank", {"model": "tiny", "query": QUERY, "documents": DOCS})
    assert body["id"].startswith("rerank-") and body["model"] == "tiny"
    order = sorted(range(len(DOCS)), key=lambda i: -ref[i])
    assert [r["index"] for r in body["results"]] == order
    assert np.allclose([r["relevance_score"] for r in body["results"]], [ref[i] for i in order], atol=1e-5)
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"])  # no "document": null
    n = body["usage"]["total_tokens"]
    assert n == sum(len(cross.model.tokenizer(QUERY, d)["input_ids"]) for d in DOCS)
    assert body["meta"]["api_version"]["version"] == "1" and body["meta"]["tokens"]["input_tokens"] == n
    top = post_ok(cross, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": True})
    assert [r["index"] for r in top["results"]] == order[:2]
    assert [r["document"] for r in top["results"]] == [{"text": DOCS[i]} for i in order[:2]]
    assert len(post_ok(cross, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0})["results"]) == 4
    assert len(post_ok(cross, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 9})["results"]) == 4
    tolerated = post_ok(cross, "/v1/rerank", {"query": QUERY, "documents": DOCS, "max_chunks_per_doc": 3})
    assert [r["index"] for r in tolerated["results"]] == order


def test_rerank_object_documents_and_rank_fields(cross, hf_scores):
    docs = [{"title": "brazil", "text": DOCS[0], "id": "a"}, {"text": DOCS[1], "id": "b"}]
    body = post_ok(cross, "/v1/rerank", {"query": QUERY, "documents": docs, "return_documents": True})
    ref = hf_scores([QUERY] * 2, DOCS[:2])
    by_index = {r["index"]: r for r in body["results"]}
    assert by_index[0]["relevance_score"] == pytest.approx(ref[0], abs=1e-5)
    assert by_index[0]["document"] == docs[0]  # the object as sent, every field kept
    fields = post_ok(cross, "/v1/rerank", {"query": QUERY, "documents": docs, "rank_fields": ["title", "text"]})
    joined = f"title: brazil\ntext: {DOCS[0]}"
    got = {r["index"]: r["relevance_score"] for r in fields["results"]}
    assert got[0] == pytest.approx(hf_scores([QUERY], [joined])[0], abs=1e-5)
    assert got[1] == pytest.approx(ref[1], abs=1e-5)  # no title: its text alone
    assert_error(cross.post("/v1/rerank", json={"query": QUERY, "documents": [{"title": "x"}]}), 400, "documents[0]")
    assert_error(cross.post("/v1/rerank", json={"query": QUERY, "documents": [{"text": 3}]}), 400,
                 "documents[0].text")


def test_rerank_v2_and_long_documents(cross, hf_scores):
    tok = cross.model.tokenizer
    body = post_ok(cross, "/v2/rerank", {"model": "tiny", "query": QUERY, "documents": DOCS + [LONG_DOC],
                                         "max_tokens_per_doc": 4})
    assert body["meta"]["api_version"]["version"] == "2"
    cut = [tok.decode(tok(d, add_special_tokens=False)["input_ids"][:4]) for d in DOCS + [LONG_DOC]]
    ref = hf_scores([QUERY] * len(cut), cut)
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert np.allclose([got[i] for i in range(len(cut))], ref, atol=1e-5)
    # without a cap, a document longer than the model takes is cut to fit (not refused)
    long = post_ok(cross, "/rerank", {"query": QUERY, "documents": [LONG_DOC]})
    assert long["usage"]["total_tokens"] == 256
    legacy = post_ok(cross, "/v2/rerank", {"query": QUERY, "documents": DOCS, "return_documents": False,
                                           "max_chunks_per_doc": 1, "relevant_spans": {"mode": "disabled"}})
    assert len(legacy["results"]) == 4


def test_rerank_errors_name_the_field(cross):
    post = lambda b, path="/rerank": cross.post(path, json=b)  # noqa: E731
    assert_error(post({"query": QUERY, "documents": DOCS, "top_n": -1}), 400, "top_n")
    assert_error(post({"query": QUERY, "documents": []}), 400, "documents")
    assert_error(post({"query": "", "documents": DOCS}), 400, "query")
    assert_error(post({"documents": DOCS}), 400, "query")
    assert_error(post({"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 0}, "/v2/rerank"), 400,
                 "max_tokens_per_doc")
    assert_error(post({"query": QUERY, "documents": DOCS, "relevant_spans": {"mode": "enabled"}}, "/v2/rerank"),
                 400, "relevant_spans.mode")
    assert_error(post({"query": LONG_DOC, "documents": DOCS}), 400, "query")
    assert_error(post({"query": QUERY, "documents": DOCS, "rank_fields": []}), 400, "rank_fields")
    assert_error(post({"query": QUERY, "documents": [1]}), 400, "documents[0]")


def test_score_and_rerank_need_a_pooling_model(tiny_llama):
    with api_client(tiny_llama) as c:
        assert_error(c.post("/score", json={"text_1": "a", "text_2": "b"}), 400, "model", contains="generate")
        assert_error(c.post("/v2/rerank", json={"query": "a", "documents": ["b"]}), 400, "model")


# --------------------------------------------------------------------------- generative scoring


def test_generative_scoring_equals_next_token_probabilities(tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with api_client(tiny_llama) as c:
        enc = c.model.encode
        query, items, labels = "Is this city the capital of France?", [" Paris", " London", " Berlin"], [9, 17, 33]

        def ref(prompt_ids):
            with torch.inference_mode():
                lp = torch.log_softmax(hf(torch.tensor([prompt_ids])).logits[0, -1], -1)
            return lp[labels]

        body = post_ok(c, "/generative_scoring", {"model": "tiny", "query": query, "items": items,
                                                  "label_token_ids": labels})
        assert body["object"] == "list" and body["id"].startswith("generative-scoring-")
        prompts = [enc(query) + enc(item, add_special_tokens=False) for item in items]
        for d, p in zip(body["data"], prompts):
            assert d["object"] == "score"
            assert d["score"] == pytest.approx(float(torch.softmax(ref(p), -1)[0]), abs=1e-4)
        n = sum(len(p) for p in prompts)
        assert body["usage"] == {"prompt_tokens": n, "total_tokens": n + 3, "completion_tokens": 3}
        raw = post_ok(c, "/generative_scoring", {"query": query, "items": items, "label_token_ids": labels,
                                                 "apply_softmax": False, "item_first": True})
        first = [enc(item) + enc(query, add_special_tokens=False) for item in items]
        for d, p in zip(raw["data"], first):
            assert d["score"] == pytest.approx(math.exp(float(ref(p)[0])), rel=1e-3)
        ids = post_ok(c, "/generative_scoring", {"query": enc(query), "items": [enc(items[0], add_special_tokens=False)],
                                                 "label_token_ids": labels})
        assert ids["data"][0]["score"] == pytest.approx(body["data"][0]["score"], abs=1e-6)
        post = lambda b: c.post("/generative_scoring", json=b)  # noqa: E731
        assert_error(post({"query": query, "items": [], "label_token_ids": labels}), 400, "items")
        assert_error(post({"query": query, "items": items, "label_token_ids": []}), 400, "label_token_ids")
        assert_error(post({"query": query, "items": items, "label_token_ids": [10**6]}), 400, "label_token_ids[0]")
        assert_error(post({"query": query, "items": items, "label_token_ids": [3, 3]}), 400, "label_token_ids")
        assert_error(post({"query": query, "items": ["x" * 3000], "label_token_ids": labels}), 400, "items[0]")
        assert_error(post({"query": query, "items": items}), 400, "label_token_ids")


def test_generative_scoring_needs_a_generative_model(cross):
    assert_error(cross.post("/generative_scoring", json={"query": "a", "items": ["b"], "label_token_ids": [1]}),
                 400, "model", contains="classify, score")
