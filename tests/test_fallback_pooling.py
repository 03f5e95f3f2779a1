"""The transformers fallback for encoders no native family runs (ModernBERT, NomicBERT): embeddings as
sentence-transformers computes them from the same folder, classification and cross-encoder scores as
transformers' own heads give them."""

from __future__ import annotations

import pytest
import torch

from apikit import api_client
from patchbay.model import PoolingModel, check_model
from patchbay_plugins.models.fallback.pooling import TransformersPoolingModel

torch.set_num_threads(1)

TEXTS = ["a cat", "the quick brown fox jumps over the lazy dog", "hello", "rain falls softly on the roof at night"]


def embeddings(client, texts) -> torch.Tensor:
    body = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"}).json()
    return torch.tensor([row["embedding"] for row in body["data"]])


@pytest.mark.parametrize("arch,mode,normalize", [("ModernBertModel", "mean", True), ("NomicBertModel", "cls", False)])
def test_embeddings_equal_sentence_transformers(arch, mode, normalize, tiny_encoder_factory):
    from sentence_transformers import SentenceTransformer

    model_dir = tiny_encoder_factory(arch, sentence_transformers=mode, normalize=normalize)
    with api_client(model_dir) as c:
        model = c.model.engine.runner.model
        assert isinstance(model, TransformersPoolingModel) and model.pool_config.mode == mode
        assert check_model("transformers", "embed", model) is PoolingModel
        got = embeddings(c, TEXTS)
        alone = embeddings(c, TEXTS[1:2])
    want = torch.tensor(SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone[0], got[1], atol=1e-5, rtol=1e-4)  # padding in a batch changes nothing
    assert bool(torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)) == normalize


def test_embeddings_without_a_sentence_transformers_folder_are_mean_pooled(tiny_encoder_factory):
    from transformers import AutoModel, AutoTokenizer

    model_dir = tiny_encoder_factory("ModernBertModel")
    with api_client(model_dir) as c:
        got = embeddings(c, TEXTS[:2])
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    for text, row in zip(TEXTS[:2], got):
        with torch.inference_mode():
            want = hf(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0)
        torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-4)


def test_classify_and_score_with_a_sequence_classifier(tiny_encoder_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = tiny_encoder_factory("ModernBertForSequenceClassification", num_labels=3)
    tok = AutoTokenizer.from_pretrained(classifier)
    hf = AutoModelForSequenceClassification.from_pretrained(classifier, dtype=torch.float32).eval()
    with api_client(classifier) as c:
        assert check_model("transformers", "classify", c.model.engine.runner.model) is PoolingModel
        data = c.post("/classify", json={"input": TEXTS}).json()["data"]
        refused = c.post("/v1/embeddings", json={"input": "a cat"})
    assert refused.status_code == 400
    with torch.inference_mode():
        want = torch.softmax(hf(**tok(TEXTS, padding=True, return_tensors="pt")).logits, -1)
    torch.testing.assert_close(torch.tensor([row["probs"] for row in data]), want, atol=1e-5, rtol=1e-4)
    assert [row["label"] for row in data] == [hf.config.id2label[int(i)] for i in want.argmax(-1)]

    cross = tiny_encoder_factory("ModernBertForSequenceClassification", num_labels=1)
    hf = AutoModelForSequenceClassification.from_pretrained(cross, dtype=torch.float32).eval()
    with api_client(cross) as c:
        scores = c.post("/score", json={"text_1": "a cat", "text_2": TEXTS[1:]}).json()["data"]
    with torch.inference_mode():
        pairs = tok(["a cat"] * 3, TEXTS[1:], padding=True, return_tensors="pt")
        want = torch.sigmoid(hf(**pairs).logits[:, 0])
    torch.testing.assert_close(torch.tensor([row["score"] for row in scores]), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["BertModel", "BertForSequenceClassification"])
def test_model_impl_transformers_on_bert_gives_the_native_results(arch, tiny_encoder_factory):
    """``--model-impl transformers`` on a folder the native bert family runs: the same embeddings / scores."""
    kwargs = {"sentence_transformers": "mean", "normalize": True} if arch == "BertModel" else {"num_labels": 3}
    model_dir = tiny_encoder_factory(arch, **kwargs)

    def results(c):
        if arch == "BertModel":
            return embeddings(c, TEXTS)
        return torch.tensor([row["probs"] for row in c.post("/classify", json={"input": TEXTS}).json()["data"]])

    with api_client(model_dir) as native:
        assert type(native.model.engine.runner.model).__name__ != "TransformersPoolingModel"
        want = results(native)
    with api_client(model_dir, model_impl="transformers") as c:
        assert isinstance(c.model.engine.runner.model, TransformersPoolingModel)
        got = results(c)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pad_token_id", [None, 5], ids=["no-pad-id", "pad-id-in-prompts"])
def test_a_decoder_classifier_reads_each_prompts_last_token(pad_token_id, tmp_path):
    """A ``Qwen2ForSequenceClassification`` (reward models, decoder classifiers) in a batch: transformers finds
    the last token by the pad id, refuses a batch without one and misreads a prompt holding it; the fallback
    gives each prompt what transformers gives it alone at its last token (as vLLM pools)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from patchbay_plugins.tinymodels.tokenizers import save_chat_tokenizer
    from patchbay_plugins.tinymodels.weights import write_config_and_weights

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, num_labels=3, initializer_range=0.125,
                 pad_token_id=pad_token_id)
    write_config_and_weights(tmp_path, "Qwen2ForSequenceClassification", "Qwen2Config", sizes, dtype=torch.float32,
                             seed=0, shards=1)
    save_chat_tokenizer(tmp_path, 512, 256, None)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    texts = TEXTS + [tok.decode([40, 41, 5]), tok.decode([5, 42])]  # prompts ending in / holding id 5
    with api_client(tmp_path) as c:
        assert isinstance(c.model.engine.runner.model, TransformersPoolingModel)
        r = c.post("/classify", json={"input": texts})
    assert r.status_code == 200, r.text
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf.config.pad_token_id = None  # one prompt alone, no pad id: transformers reads its last token
    with torch.inference_mode():
        want = torch.cat([torch.softmax(hf(**tok(t, return_tensors="pt")).logits, -1) for t in texts])
    torch.testing.assert_close(torch.tensor([row["probs"] for row in r.json()["data"]]), want, atol=1e-5, rtol=1e-4)


def test_a_decoder_cross_encoder_scores_pairs(tmp_path):
    """A ``Qwen3ForSequenceClassification`` with one label (a decoder reranker): /score and /rerank give
    transformers' sigmoid of each pair alone, batched."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from patchbay_plugins.tinymodels.tokenizers import save_chat_tokenizer
    from patchbay_plugins.tinymodels.weights import write_config_and_weights

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, num_labels=1, initializer_range=0.125)
    write_config_and_weights(tmp_path, "Qwen3ForSequenceClassification", "Qwen3Config", sizes, dtype=torch.float32,
                             seed=0, shards=1)
    save_chat_tokenizer(tmp_path, 512, 256, None)
    docs = TEXTS[1:]
    with api_client(tmp_path) as c:
        scores = [row["score"] for row in c.post("/score", json={"text_1": "a cat", "text_2": docs}).json()["data"]]
        ranked = c.post("/rerank", json={"query": "a cat", "documents": docs}).json()["results"]
    tok = AutoTokenizer.from_pretrained(tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = [float(torch.sigmoid(hf(**tok("a cat", d, return_tensors="pt")).logits[0, 0])) for d in docs]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(want), atol=1e-5, rtol=1e-4)
    assert [r["index"] for r in ranked] == sorted(range(len(docs)), key=lambda i: -want[i])
