"""CLIP through the pooling endpoints, in process: text and image embeddings equal transformers' features
(normalised as vLLM serves them), image documents in /score and /rerank scored by cosine, Cohere embed with
images, one text or one image per input, and a repeated image embedded once."""

from __future__ import annotations

import base64
import functools
import io

import pytest

import imagekit
from apikit import api_client, assert_error
from serverkit import parse_metrics


@functools.lru_cache(maxsize=None)
def reference(model_dir):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    return (CLIPModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir),
            AutoImageProcessor.from_pretrained(model_dir))


def hf_text(model_dir, text):
    import torch
    import torch.nn.functional as F

    model, tok, _ = reference(model_dir)
    with torch.no_grad():
        out = model.get_text_features(**tok(text, return_tensors="pt"))
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    return F.normalize(out, dim=-1)[0]


def hf_image(model_dir, url):
    import torch
    import torch.nn.functional as F
    from PIL import Image

    model, _, proc = reference(model_dir)
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    with torch.no_grad():
        out = model.get_image_features(**proc(img, return_tensors="pt"))
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    return F.normalize(out, dim=-1)[0]


def close(got, want, tol=2e-5):
    assert len(got) == len(want)
    assert max(abs(a - float(b)) for a, b in zip(got, want)) < tol, (got[:4], want[:4])


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


IMG = [imagekit.png_url(40, 48, 1), imagekit.png_url(64, 30, 2, "RGBA"), imagekit.png_url(32, 32, 3)]


@pytest.fixture(scope="module")
def client(tiny_clip):
    with api_client(tiny_clip, max_model_len=None) as c:
        yield c


def test_text_and_image_embeddings_equal_transformers(client, tiny_clip):
    r = client.post("/v1/embeddings", json={"input": ["a cat", "a photo of a river"]}).json()
    for item, text in zip(r["data"], ["a cat", "a photo of a river"]):
        close(item["embedding"], hf_text(tiny_clip, text))
    for url in IMG:
        body = {"messages": [{"role": "user", "content": [image_part(url)]}], "encoding_format": "float"}
        r = client.post("/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        close(r.json()["data"][0]["embedding"], hf_image(tiny_clip, url))
        assert r.json()["usage"]["prompt_tokens"] == 17  # the tower's positions: class token + 16 patches
    # the one text of a messages input embeds as text
    r = client.post("/v1/embeddings", json={"messages": [{"role": "user", "content": "a cat"}]}).json()
    close(r["data"][0]["embedding"], hf_text(tiny_clip, "a cat"))


def test_an_image_embedded_again_comes_from_the_cache(client, tiny_clip):
    url = imagekit.png_url(50, 50, 9)
    cache = client.model.engine.runner.image_cache
    body = {"messages": [{"role": "user", "content": [image_part(url)]}]}
    first = client.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    misses, hits = cache.misses, cache.hits
    before = parse_metrics(client.get("/metrics").text)
    second = client.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    assert first == second and cache.misses == misses and cache.hits == hits + 1
    after = parse_metrics(client.get("/metrics").text)
    assert [after[k] - before[k] for k in ("mm_cache_queries_total", "mm_cache_hits_total")] == [1, 1]


@pytest.mark.parametrize("content,param", [
    ([image_part(IMG[0]), {"type": "text", "text": "and text"}], "messages"),
    ([image_part(IMG[0]), image_part(IMG[1])], "messages"),
])
def test_two_things_in_one_input_are_a_400(client, content, param):
    r = client.post("/v1/embeddings", json={"messages": [{"role": "user", "content": content}]})
    assert_error(r, 400, param, contains="one text or one image")


def test_score_and_rerank_with_image_documents(client, tiny_clip):
    import torch

    query = "a cat on a mat"
    q = hf_text(tiny_clip, query)
    want = [float(torch.dot(q, hf_image(tiny_clip, url))) for url in IMG]
    r = client.post("/score", json={"text_1": query, "text_2": {"content": [image_part(u) for u in IMG]}})
    assert r.status_code == 200, r.text
    close([d["score"] for d in r.json()["data"]], want, 1e-5)
    r = client.post("/v1/score", json={"text_1": query, "text_2": [{"content": [image_part(u)]} for u in IMG]})
    close([d["score"] for d in r.json()["data"]], want, 1e-5)

    docs = [{"content": [image_part(IMG[0])]}, "a dog", {"image": IMG[1]}, {"content": [image_part(IMG[2])]}]
    text_score = float(torch.dot(q, hf_text(tiny_clip, "a dog")))
    expected = {0: want[0], 1: text_score, 2: want[1], 3: want[2]}
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = client.post(path, json={"query": query, "documents": docs, "return_documents": True})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == sorted(expected, key=lambda i: -expected[i])
        close([x["relevance_score"] for x in results], [expected[x["index"]] for x in results], 1e-5)
        assert results[[x["index"] for x in results].index(1)]["document"] == {"text": "a dog"}
    r = client.post("/rerank", json={"query": query, "documents": {"content": [image_part(u) for u in IMG]},
                                     "top_n": 1})
    assert r.json()["results"][0]["index"] == max(range(3), key=lambda i: want[i])


def test_score_and_rerank_bad_image_documents(client):
    r = client.post("/rerank", json={"query": "q", "documents": [{"content": [image_part("data:image/png;base64,!!")]}]})
    assert_error(r, 400, "documents[0].content[0]", contains="base64")
    r = client.post("/rerank", json={"query": "q", "documents": [
        {"content": [image_part(IMG[0]), {"type": "text", "text": "x"}]}]})
    assert_error(r, 400, "documents[0].content", contains="one text or one image")
    r = client.post("/score", json={"text_1": {"content": [image_part(IMG[0])]}, "text_2": "a cat"})
    assert_error(r, 400, "text_1", contains="must be text")
    assert client.post("/score", json={"text_1": "a", "text_2": "b"}).status_code == 200


def test_cohere_embed_with_images(client, tiny_clip):
    r = client.post("/v2/embed", json={"images": IMG[:2], "input_type": "image", "embedding_types": ["float"]})
    assert r.status_code == 200, r.text
    for got, url in zip(r.json()["embeddings"]["float"], IMG):
        close(got, hf_image(tiny_clip, url))
    r = client.post("/v2/embed", json={"inputs": [{"content": [image_part(IMG[2])]},
                                                  {"content": [{"type": "text", "text": "a cat"}]}],
                                       "input_type": "search_document", "embedding_types": ["float", "int8"]})
    vecs = r.json()["embeddings"]["float"]
    close(vecs[0], hf_image(tiny_clip, IMG[2]))
    close(vecs[1], hf_text(tiny_clip, "a cat"))
    r = client.post("/v1/embed", json={"images": [IMG[0]], "input_type": "image"})
    assert r.json()["response_type"] == "embeddings_floats"
    close(r.json()["embeddings"][0], hf_image(tiny_clip, IMG[0]))
    r = client.post("/v2/embed", json={"inputs": [{"content": [image_part(IMG[0]), {"type": "text", "text": "x"}]}],
                                       "input_type": "search_document", "embedding_types": ["float"]})
    assert_error(r, 400, "inputs[0].content", contains="one text or one image")
    r = client.post("/v2/embed", json={"images": ["http://10.0.0.1/a.png"], "input_type": "image",
                                       "embedding_types": ["float"]})
    assert_error(r, 400, "images[0]", contains="private")
    r = client.post("/v2/embed", json={"texts": ["a"], "images": [IMG[0]], "input_type": "image",
                                       "embedding_types": ["float"]})
    assert_error(r, 400, contains="one of texts, images or inputs")


def test_text_only_embedders_refuse_images(minilm_dir):
    with api_client(minilm_dir) as c:
        r = c.post("/v1/embeddings", json={"messages": [{"role": "user", "content": [image_part(IMG[0])]}]})
        assert_error(r, 400, contains="text only")
        r = c.post("/v2/embed", json={"images": [IMG[0]], "input_type": "image", "embedding_types": ["float"]})
        assert_error(r, 400, "images", contains="text only")
        r = c.post("/v2/embed", json={"inputs": [{"content": [image_part(IMG[0])]}], "input_type": "search_query",
                                      "embedding_types": ["float"]})
        assert_error(r, 400, "inputs[0].content[0]", contains="text only")
        r = c.post("/rerank", json={"query": "q", "documents": [{"content": [image_part(IMG[0])]}]})
        assert_error(r, 400, "documents[0].content[0]", contains="text only")
