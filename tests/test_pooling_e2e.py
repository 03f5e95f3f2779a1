"""Real ``serve`` processes driven by the official clients: openai embeddings (its default base64)
and Cohere's ``Client`` (v1) and ``ClientV2`` embed on the real MiniLM; Cohere rerank v1 / v2 and a
Jina-shaped request on a tiny cross-encoder; generative scoring on the tiny Llama."""

from __future__ import annotations

import cohere
import httpx
import numpy as np
import openai
import pytest

from serverkit import serve

pytestmark = pytest.mark.e2e

KEY = "sk-pool-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.",
         "A man is playing a large flute."]
QUERY = "what is the capital of france"
DOCS = ["the capital of brazil is brasilia", "the capital of france is paris", "horses and cows are animals"]


@pytest.fixture(scope="module")
def minilm_server(minilm_dir, tmp_path_factory):
    args = [str(minilm_dir), "--served-model-name", "minilm", "--api-key", KEY]
    with serve(args, tmp_path_factory.mktemp("minilm")) as s:
        yield s


@pytest.fixture(scope="module")
def st_vectors(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)


@pytest.fixture(scope="module")
def cross_server(tiny_encoder_factory, tmp_path_factory):
    model = tiny_encoder_factory("BertForSequenceClassification", num_labels=1)
    with serve([str(model), "--served-model-name", "rr", "--api-key", KEY], tmp_path_factory.mktemp("rr")) as s:
        yield s


def cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# --------------------------------------------------------------------------- embeddings


def test_openai_client_embeddings_equal_sentence_transformers(minilm_server, st_vectors):
    client = openai.OpenAI(base_url=minilm_server.url + "/v1", api_key=KEY, max_retries=0)
    r = client.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (4, 384) and (cos(got, st_vectors) >= 0.9999).all()
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    floats = client.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="float")
    assert np.array_equal(np.float32(floats.data[0].embedding), np.float32(got[0]))
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="minilm", input=TEXTS[0], dimensions=1000)
    assert exc.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="minilm", input=[])
    assert exc.value.body["param"] == "input"


def test_cohere_v1_client_embed(minilm_server, st_vectors):
    co = cohere.Client(api_key=KEY, base_url=minilm_server.url, max_retries=0)
    r = co.embed(texts=TEXTS, model="minilm", input_type="search_document")
    assert r.response_type == "embeddings_floats" and r.id and list(r.texts) == TEXTS
    assert (cos(r.embeddings, st_vectors) >= 0.9999).all()
    typed = co.embed(texts=TEXTS, model="minilm", embedding_types=["float", "int8", "uint8", "binary", "ubinary"])
    assert typed.response_type == "embeddings_by_type"
    e = typed.embeddings
    assert (cos(e.float_, st_vectors) >= 0.9999).all()
    assert np.array_equal(np.array(e.uint8), np.array(e.int8) + 128)
    assert np.array_equal(np.array(e.ubinary), np.packbits(np.array(e.float_) > 0, axis=-1))
    assert np.array_equal(np.array(e.binary), np.array(e.ubinary) - 128)
    with pytest.raises(cohere.BadRequestError) as exc:
        co.embed(texts=TEXTS[:1], model="minilm", embedding_types=["float", "nibble"])
    assert exc.value.body["error"]["param"] == "embedding_types[1]"


def test_cohere_v2_client_embed_every_type(minilm_server, st_vectors):
    co = cohere.ClientV2(api_key=KEY, base_url=minilm_server.url, max_retries=0)
    kinds = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    r = co.embed(texts=TEXTS, model="minilm", input_type="search_query", embedding_types=kinds, truncate="END")
    e = r.embeddings
    assert r.id and list(r.texts) == TEXTS and r.meta.api_version.version == "2"
    assert (cos(e.float_, st_vectors) >= 0.9999).all()
    floats = np.array(e.float_, dtype=np.float32)
    assert np.array_equal(np.array(e.int8), np.clip(np.rint(floats * 127), -128, 127))
    assert np.array_equal(np.array(e.uint8), np.array(e.int8) + 128)
    assert np.array_equal(np.array(e.ubinary), np.packbits(floats > 0, axis=-1))
    assert np.array_equal(np.array(e.binary), np.array(e.ubinary) - 128)
    import base64

    assert np.array_equal(np.stack([np.frombuffer(base64.b64decode(s), "<f4") for s in e.base64]), floats)
    with pytest.raises(cohere.BadRequestError) as exc:
        co.embed(texts=[" ".join(["word"] * 400)], model="minilm", input_type="search_query", truncate="NONE")
    assert exc.value.body["error"]["param"] == "texts[0]"


# --------------------------------------------------------------------------- rerank / score / classify


def test_cohere_clients_rerank(cross_server):
    co = cohere.Client(api_key=KEY, base_url=cross_server.url, max_retries=0)
    r = co.rerank(model="rr", query=QUERY, documents=DOCS, top_n=2)
    assert len(r.results) == 2 and r.id
    assert r.results[0].relevance_score >= r.results[1].relevance_score
    assert all(x.document is None for x in r.results)
    full = co.rerank(model="rr", query=QUERY, documents=DOCS, return_documents=True)
    scores = {x.index: x.relevance_score for x in full.results}
    assert [x.document.text for x in full.results] == [DOCS[x.index] for x in full.results]
    objs = [{"title": "t", "text": d} for d in DOCS]
    by_obj = co.rerank(model="rr", query=QUERY, documents=objs, rank_fields=["text"], return_documents=True)
    assert {x.index: x.relevance_score for x in by_obj.results} == pytest.approx(scores, abs=1e-6)
    assert by_obj.results[0].document.text == DOCS[by_obj.results[0].index]
    v2 = cohere.ClientV2(api_key=KEY, base_url=cross_server.url, max_retries=0)
    r2 = v2.rerank(model="rr", query=QUERY, documents=DOCS, top_n=3, max_tokens_per_doc=512)
    assert {x.index: x.relevance_score for x in r2.results} == pytest.approx(scores, abs=1e-6)
    assert r2.meta.api_version.version == "2"
    with pytest.raises(cohere.BadRequestError) as exc:
        v2.rerank(model="rr", query=QUERY, documents=DOCS, top_n=-1)
    assert exc.value.body["error"]["param"] == "top_n"


def test_jina_shaped_rerank_score_and_classify_over_http(cross_server):
    url = cross_server.url
    with httpx.Client(headers=AUTH, timeout=30) as http:
        r = http.post(url + "/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCS, "top_n": 2,
                                                "return_documents": True})
        body = r.json()
        assert r.status_code == 200 and body["usage"]["total_tokens"] > 0
        assert [set(x) for x in body["results"]] == [{"index", "document", "relevance_score"}] * 2
        assert body["results"][0]["document"] == {"text": DOCS[body["results"][0]["index"]]}
        plain = http.post(url + "/rerank", json={"query": QUERY, "documents": DOCS}).json()
        scores = {x["index"]: x["relevance_score"] for x in plain["results"]}
        score = http.post(url + "/score", json={"model": "rr", "text_1": QUERY, "text_2": DOCS}).json()
        assert [d["score"] for d in score["data"]] == pytest.approx([scores[i] for i in range(3)], abs=1e-6)
        cls = http.post(url + "/classify", json={"input": DOCS[:2]}).json()
        assert [d["num_classes"] for d in cls["data"]] == [1, 1]
        assert all(0 < d["probs"][0] < 1 and d["label"] == "LABEL_0" for d in cls["data"])  # sigmoid of one logit
        bad = http.post(url + "/score", json={"text_1": ["a", "b"], "text_2": ["c"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2"
        assert http.post(url + "/v1/embeddings", json={"input": "a"}).status_code == 400


def test_generative_scoring_over_http(tiny_llama, tmp_path):
    with serve([str(tiny_llama), "--served-model-name", "tiny"], tmp_path) as s:
        r = httpx.post(s.url + "/generative_scoring", json={
            "model": "tiny", "query": "Is this the capital of France?", "items": [" Paris", " Rome"],
            "label_token_ids": [9, 17]}, timeout=30)
        body = r.json()
        assert r.status_code == 200, r.text
        assert [d["index"] for d in body["data"]] == [0, 1] and all(0 < d["score"] < 1 for d in body["data"])
        assert body["usage"]["completion_tokens"] == 2
        assert "Traceback" not in s.output()
