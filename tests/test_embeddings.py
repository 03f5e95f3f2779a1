"""/v1/embeddings, /pooling and /classify in-process: the real MiniLM against sentence-transformers,
tiny encoders for Matryoshka, chat-shaped input and classifiers; every bad input a 400 naming its field."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apikit import api_client, assert_error

EMB = "/v1/embeddings"

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "x",
    "Ünïcödé text — with dashes, CAPITALS and an emoji 🙂",
    "Embeddings are computed in one flat batch of varied lengths.",
]
LONG = " ".join(["river"] * 300)  # over MiniLM's max_seq_length of 256


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    with api_client(minilm_dir, max_model_len=None) as c:
        yield c


def vectors(body) -> np.ndarray:
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def embed(client, **body):
    r = client.post(EMB, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- the real MiniLM


def test_minilm_equals_sentence_transformers(minilm, st_model):
    body = embed(minilm, input=TEXTS, model="tiny")
    ours = vectors(body)
    ref = st_model.encode(TEXTS)
    assert ours.shape == ref.shape == (len(TEXTS), 384)
    assert (cosines(ours, ref) >= 0.9999).all(), cosines(ours, ref)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # one at a time (a batch of one per step) gives the same vectors as the batch
    alone = vectors(embed(minilm, input=TEXTS[1]))
    assert (cosines(alone, ours[1:2]) >= 0.99999).all()
    # sentence-transformers cuts at max_seq_length; we do so when asked to (-1: the model's limit)
    cut = vectors(embed(minilm, input=[LONG], truncate_prompt_tokens=-1))
    assert cosines(cut, st_model.encode([LONG]))[0] >= 0.9999


def test_response_shape_usage_and_ids(minilm):
    tok = minilm.model.tokenizer
    body = embed(minilm, input=TEXTS[:2], request_id="abc-1")
    assert body["id"] == "embd-abc-1" and body["object"] == "list" and body["model"] == "tiny"
    assert isinstance(body["created"], int)
    assert [d["index"] for d in body["data"]] == [0, 1] and {d["object"] for d in body["data"]} == {"embedding"}
    n = sum(len(tok(t)["input_ids"]) for t in TEXTS[:2])
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    r = minilm.post(EMB, json={"input": "hi"}, headers={"X-Request-Id": "from-header"})
    assert r.json()["id"] == "embd-from-header"


def test_base64_is_little_endian_float32_of_the_same_vector(minilm):
    floats = embed(minilm, input=TEXTS[:2])["data"]
    b64 = embed(minilm, input=TEXTS[:2], encoding_format="base64")["data"]
    for f, b in zip(floats, b64):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.shape == (384,)
        assert np.array_equal(decoded, np.asarray(f["embedding"], dtype=np.float32))


def test_token_id_inputs_equal_text_inputs(minilm):
    tok = minilm.model.tokenizer
    ids = [tok(t)["input_ids"] for t in TEXTS[:3]]
    by_text = vectors(embed(minilm, input=TEXTS[:3]))
    by_ids = vectors(embed(minilm, input=ids))
    one = vectors(embed(minilm, input=ids[0]))
    assert np.allclose(by_text, by_ids, atol=1e-6) and np.allclose(one[0], by_text[0], atol=1e-6)
    # add_special_tokens=false: no [CLS]/[SEP], the same as ids without them
    bare = vectors(embed(minilm, input=TEXTS[0], add_special_tokens=False))
    bare_ids = vectors(embed(minilm, input=tok(TEXTS[0], add_special_tokens=False)["input_ids"]))
    assert np.allclose(bare, bare_ids, atol=1e-6) and not np.allclose(bare, by_text[:1], atol=1e-3)


def test_truncate_prompt_tokens_and_side(minilm):
    tok = minilm.model.tokenizer
    text = "one two three four five six seven eight"
    ids = tok(text)["input_ids"]  # [CLS] 8 words [SEP]
    right = vectors(embed(minilm, input=text, truncate_prompt_tokens=5))
    left = vectors(embed(minilm, input=text, truncate_prompt_tokens=5, truncation_side="left"))
    assert np.allclose(right, vectors(embed(minilm, input=ids[:4] + ids[-1:])), atol=1e-6)
    assert np.allclose(left, vectors(embed(minilm, input=ids[:1] + ids[-4:])), atol=1e-6)
    body = embed(minilm, input=[ids, ids[:3]], truncate_prompt_tokens=5)  # token ids are cut as they are
    assert body["usage"]["prompt_tokens"] == 5 + 3


def test_minilm_bad_inputs_are_400s_naming_the_field(minilm):
    post = lambda **b: minilm.post(EMB, json=b)  # noqa: E731
    assert_error(post(input=[]), 400, "input")
    assert_error(post(input=""), 400, "input")
    assert_error(post(input=["ok", ""]), 400, "input[1]")
    assert_error(post(input=[[]]), 400, "input[0]")
    assert_error(post(), 400, "input")
    err = assert_error(post(input=["fine", LONG]), 400, "input[1]")
    assert "256" in err["message"] and "302" in err["message"]
    assert_error(post(input="a", dimensions=385), 400, "dimensions", contains="384")
    assert_error(post(input="a", dimensions=128), 400, "dimensions", contains="Matryoshka")
    assert_error(post(input="a", dimensions=0), 400, "dimensions")
    assert embed(minilm, input="a", dimensions=384)["data"][0]["embedding"]  # the full size is always fine
    assert_error(post(input="a", encoding_format="double"), 400, "encoding_format")
    assert_error(post(input="a", normalize=True), 400, "normalize", contains="Unrecognized")
    assert_error(post(input="a", priority=1), 400, "priority")
    assert_error(post(input="a", messages=[{"role": "user", "content": "b"}]), 400, "messages")
    assert_error(post(input=[999999]), 400, "input")
    assert_error(post(input="a", truncate_prompt_tokens=0), 400, "truncate_prompt_tokens")
    assert_error(post(input="a", truncate_prompt_tokens=1000), 400, "truncate_prompt_tokens")
    assert_error(post(input="a", truncate_prompt_tokens=2), 400, "truncate_prompt_tokens")
    assert_error(post(input="a", truncation_side="middle"), 400, "truncation_side")
    assert_error(post(input="a", mm_processor_kwargs={"x": 1}), 400, "mm_processor_kwargs")
    assert_error(post(input="a", model="other"), 404, "model")
    assert_error(post(input=7), 400, "input")
    assert_error(post(messages=[{"role": "user", "content": "hi"}]), 400, "messages")  # no chat template
    assert embed(minilm, input="a", user="someone")["data"]


def test_tasks_the_model_cannot_do(minilm):
    err = assert_error(minilm.post("/classify", json={"input": "a"}), 400, "model")
    assert "embed, score" in err["message"]


# --------------------------------------------------------------------------- tiny encoders


def test_matryoshka_truncates_then_renormalises(tiny_encoder_factory):
    model = tiny_encoder_factory("BertModel", sentence_transformers=True, matryoshka_dimensions=[16, 32, 64])
    with api_client(model) as c:
        full = torch.tensor(embed(c, input=TEXTS[:2])["data"][0]["embedding"])
        cut = torch.tensor(embed(c, input=TEXTS[:2], dimensions=16)["data"][0]["embedding"])
        assert cut.shape == (16,)
        torch.testing.assert_close(cut, F.normalize(full[:16], dim=-1), atol=1e-6, rtol=1e-5)
        assert_error(c.post(EMB, json={"input": "a", "dimensions": 20}), 400, "dimensions", contains="[16, 32, 64]")
        assert_error(c.post(EMB, json={"input": "a", "dimensions": 65}), 400, "dimensions")


def test_messages_go_through_the_chat_template(tiny_encoder_factory):
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    model = tiny_encoder_factory("BertModel", sentence_transformers=True)
    with api_client(model, chat_template=template) as c:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a river"}]
        rendered = "system: be brief\nuser: a river\n"
        ids = c.model.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        by_msgs = embed(c, messages=msgs)
        assert by_msgs["usage"]["prompt_tokens"] == len(ids)
        assert np.allclose(vectors(by_msgs), vectors(embed(c, input=ids)), atol=1e-6)
        with_special = embed(c, messages=msgs, add_special_tokens=True)
        assert with_special["usage"]["prompt_tokens"] == len(ids) + 2
        # /pooling takes the same inputs and gives the same vectors
        pooled = c.post("/pooling", json={"messages": msgs}).json()
        assert pooled["id"].startswith("pool-") and pooled["data"][0]["object"] == "pooling"
        assert np.allclose(pooled["data"][0]["data"], by_msgs["data"][0]["embedding"], atol=1e-7)
        assert_error(c.post(EMB, json={"messages": []}), 400, "messages")
        assert_error(c.post(EMB, json={"messages": msgs, "chat_template": "{{ 1 }}"}), 400, "chat_template")


def test_classify_and_pooling_on_a_classifier(tiny_encoder_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = tiny_encoder_factory("BertForSequenceClassification", num_labels=3,
                                 id2label={0: "neg", 1: "neutral", 2: "pos"})
    hf = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model)
    texts = ["loved the new cafe", "this update broke everything", "ok"]
    with torch.inference_mode():
        enc = tok(texts, padding=True, return_tensors="pt")
        ref = torch.softmax(hf(**enc).logits, -1)
    with api_client(model) as c:
        r = c.post("/classify", json={"input": texts, "model": "tiny"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("classify-") and body["object"] == "list"
        labels = {0: "neg", 1: "neutral", 2: "pos"}
        for i, d in enumerate(body["data"]):
            assert d["index"] == i and d["num_classes"] == 3
            torch.testing.assert_close(torch.tensor(d["probs"]), ref[i], atol=1e-5, rtol=1e-4)
            assert d["label"] == labels[int(ref[i].argmax())]
        n = sum(len(tok(t)["input_ids"]) for t in texts)
        assert body["usage"]["prompt_tokens"] == n == body["usage"]["total_tokens"]
        single = c.post("/classify", json={"input": texts[0]}).json()
        assert np.allclose(single["data"][0]["probs"], body["data"][0]["probs"], atol=1e-6)
        pooled = c.post("/pooling", json={"input": texts}).json()
        assert np.allclose([d["data"] for d in pooled["data"]], [d["probs"] for d in body["data"]], atol=1e-6)
        assert_error(c.post("/pooling", json={"input": "a", "dimensions": 8}), 400, "dimensions")
        err = assert_error(c.post(EMB, json={"input": "a"}), 400, "model")
        assert "classify, score" in err["message"]
        assert_error(c.post("/classify", json={"input": []}), 400, "input")
        assert_error(c.post("/classify", json={"input": "a", "priority": 2}), 400, "priority")


def test_generative_model_has_no_embeddings_but_a_decoder_can_embed(tiny_llama):
    from transformers import AutoModel

    with api_client(tiny_llama) as c:
        err = assert_error(c.post(EMB, json={"input": "a"}), 400, "model")
        assert "generate" in err["message"]
        assert_error(c.post("/pooling", json={"input": "a"}), 400, "model")
    with api_client(tiny_llama, convert="embed") as c:
        text = "a river runs through it"
        body = embed(c, input=[text, "short"])
        hf = AutoModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        ids = c.model.encode(text)
        with torch.inference_mode():
            last = hf(torch.tensor([ids])).last_hidden_state[0, -1]
        torch.testing.assert_close(torch.tensor(body["data"][0]["embedding"]), F.normalize(last, dim=-1),
                                   atol=1e-4, rtol=1e-4)
