"""The bert model family (BERT / RoBERTa / XLM-R encoders and cross-encoders) against transformers.

Every comparison runs transformers (eager attention, a padded batch with an
attention mask) and our plugin (one flat, unpadded batch) on the same tokens.
Embeddings are also checked against sentence-transformers itself, on tiny
random ST folders and on the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from patchbay_plugins.models.sentence_transformers import PoolingConfig, pool, read_pooling_config
from patchbay_plugins.tinymodels import write_sentence_transformers_files
from patchbay.model import GenerativeModel, PoolingModel
from patchbay.weights import CheckpointError
from patchbay_plugins.models import bert as bert_plugin

#: the six architectures of the family, bare encoders first
ENCODER_ARCHS = bert_plugin.ARCHITECTURES

torch.set_num_threads(1)

ATOL = 1e-4

TEXTS = [
    "The morning train left the station a little after seven.",
    "Hi",
    "A porter swept the last paper cups into a bin, a pigeon walked along the edge of the track, and the clock "
    "above the ticket office ticked on as if nothing had happened at all.",
    "Maria had missed it by less than a minute.",
    "naïve café — Ünïcödé 日本語 😀",
]
PAIRS = [
    "When did the train leave?",
    "Hello there, how are you today?",
    "pigeon",
    "She stood at the top of the stairs with her bag in one hand and a half-eaten apple in the other.",
    "unicode",
]


# --------------------------------------------------------------------------- helpers


def our_model(model_dir, dtype=torch.float32):
    from transformers import AutoConfig

    from patchbay.model import LoadRequest

    cfg = AutoConfig.from_pretrained(model_dir)
    task = "classify" if cfg.architectures[0].endswith("ForSequenceClassification") else "embed"
    return bert_plugin.load(LoadRequest(model_dir=model_dir, hf_config=cfg, task=task, dtype=dtype,
                                        device=torch.device("cpu")))


def tokenize(model_dir, texts, pairs=None, max_length=None):
    """``(padded_batch_encoding, flat_ids, flat_token_type_ids_or_None, seq_lens)``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(texts, pairs, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    lens = enc["attention_mask"].sum(1).tolist()
    assert enc["attention_mask"].sum().item() == sum(lens)  # right padding
    ids = torch.cat([enc["input_ids"][i, :n] for i, n in enumerate(lens)])
    tt = None
    if "token_type_ids" in enc:
        tt = torch.cat([enc["token_type_ids"][i, :n] for i, n in enumerate(lens)])
    return enc, ids, tt, lens


def hf_hidden(model_dir, enc, lens):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    return torch.cat([hidden[i, :n] for i, n in enumerate(lens)])


def hf_logits(model_dir, enc):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**enc).logits


def st_encode(model_dir, texts, **kwargs):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    return torch.as_tensor(model.encode(texts, convert_to_numpy=True, **kwargs))


def assert_close(ours, ref, atol=ATOL, what=""):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    diff = (ours - ref).abs().max().item()
    assert diff < atol, f"{what}: max abs diff {diff:.3g} >= {atol}"


#: attention paths of a flat batch: (pad_waste_limit, name); None: the model's default choice.
#: Equal lengths always take the dense path.
ATTENTION_PATHS = ((float("inf"), "padded"), (0.0, "split"), (None, "auto"))


def set_attention_path(model, limit):
    if limit is None:
        model.__dict__.pop("pad_waste_limit", None)  # back to the class default
    else:
        model.pad_waste_limit = limit


def encoder_kwargs(arch):
    """Builder kwargs per arch: ST folders for the bare encoders, 3 labels for the classifiers."""
    if arch.endswith("ForSequenceClassification"):
        return {"num_labels": 3, "seed": 1 if arch.startswith("XLM") else 0}
    return {"sentence_transformers": "mean", "seed": 1 if arch.startswith("XLM") else 0}


# --------------------------------------------------------------------------- the plugin itself


def test_registers_families_and_imports_light():
    import subprocess
    import sys

    code = (
        "import sys; import patchbay_plugins.models.bert as m; "
        "fams = []; m.register_model_families(fams.append); "
        "assert {f.name for f in fams} == {'bert'}; "
        "tasks = {a: f.tasks for f in fams for a in f.architectures}; "
        "assert tasks['BertModel'] == tasks['XLMRobertaModel'] == frozenset({'embed'}); "
        "assert tasks['RobertaForSequenceClassification'] == frozenset({'classify', 'score'}); "
        "assert len(tasks) == 6; "
        "assert 'torch' not in sys.modules, 'plugin import pulled in torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_picks_bert_per_task():
    from patchbay.registry import Registries

    reg = Registries()
    bert_plugin.register_model_families(reg.family_registrar("bert"))
    assert reg.tasks_for(["BertModel"]) == ["embed"]
    assert reg.tasks_for(["XLMRobertaForSequenceClassification"]) == ["classify", "score"]
    assert reg.family_for(["RobertaModel"], "embed").load is bert_plugin.load


@pytest.mark.parametrize("arch", ENCODER_ARCHS)
def test_interface_attributes(tiny_encoder_factory, arch):
    model = our_model(tiny_encoder_factory(arch, **encoder_kwargs(arch)))
    classifier = arch.endswith("ForSequenceClassification")
    roberta = "Roberta" in arch
    assert isinstance(model, torch.nn.Module)
    assert isinstance(model, PoolingModel) and not isinstance(model, GenerativeModel)
    assert model.hidden_size == 64 and model.vocab_size == 512
    assert model.max_position_embeddings == 512  # RoBERTa: 514 - padding_idx (1) - 1
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert model.uses_token_type_ids is (not roberta)
    assert not any(p.requires_grad for p in model.parameters())
    if classifier:
        assert model.pooling.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
        assert model.pooling.tasks == ("classify", "score") and model.pooling.score_rule == "cross-encoder"
        assert model.pool_config == PoolingConfig(mode="cls", normalize=False)
        assert model.pooling.max_input_tokens is None
    else:
        assert model.pooling.labels == () and model.pooling.tasks == ("embed", "score")
        assert model.pooling.embedding_size == 64 and model.pooling.normalize
        assert model.pool_config.mode == "mean" and model.pool_config.normalize
        assert model.pool_config.source == "sentence-transformers"


def test_bare_encoder_default_pooling(tiny_encoder_factory):
    """No ST folder: mean pooling, no normalisation, no max_seq_length."""
    model = our_model(tiny_encoder_factory("BertModel"))
    assert model.pool_config == PoolingConfig(mode="mean", normalize=False, max_seq_length=None)
    assert model.pooling.max_input_tokens is None


# --------------------------------------------------------------------------- equivalence with transformers


@pytest.mark.parametrize("arch", [a for a in ENCODER_ARCHS if a.endswith("Model")])
def test_embeddings_match_transformers_and_sentence_transformers(tiny_encoder_factory, arch):
    model_dir = tiny_encoder_factory(arch, **encoder_kwargs(arch))
    model = our_model(model_dir)
    enc, ids, tt, lens = tokenize(model_dir, TEXTS)
    assert len(set(lens)) >= 3  # really variable-length
    ref_hidden = hf_hidden(model_dir, enc, lens)
    ref = pool(ref_hidden, lens, model.pool_config)
    for limit, path in ATTENTION_PATHS:
        set_attention_path(model, limit)
        assert_close(model.forward_hidden(ids, tt, lens), ref_hidden, what=f"hidden ({path})")
        assert_close(model.forward_pool(ids, tt, lens, "embed"), ref, what=f"embed ({path})")
    # the ST folder through sentence-transformers itself (normalised mean pooling)
    out = model.forward_pool(ids, tt, lens, "embed")
    assert out.dtype == torch.float32 and out.shape == (len(TEXTS), 64)
    assert_close(out, st_encode(model_dir, TEXTS), what="vs SentenceTransformer")
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


@pytest.mark.parametrize("arch", [a for a in ENCODER_ARCHS if a.endswith("ForSequenceClassification")])
def test_classifier_logits_match_transformers(tiny_encoder_factory, arch):
    model_dir = tiny_encoder_factory(arch, **encoder_kwargs(arch))
    model = our_model(model_dir)
    enc, ids, tt, lens = tokenize(model_dir, TEXTS, PAIRS)
    if "Roberta" not in arch:  # BERT pairs: segment B has token type 1
        assert tt is not None and tt.sum() > 0
    ref = hf_logits(model_dir, enc)
    for limit, path in ATTENTION_PATHS:
        set_attention_path(model, limit)
        logits = model.forward_pool(ids, tt, lens, "classify")
        assert logits.dtype == torch.float32 and logits.shape == (len(TEXTS), 3)
        assert_close(logits, ref, what=f"classify ({path})")
    assert torch.equal(model.forward_pool(ids, tt, lens, "score"), model.forward_pool(ids, tt, lens, "classify"))
    # the classifier's own hidden states match too (the last layer is not cut short there)
    hidden = model.forward_hidden(ids, tt, lens)
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        h = hf(**enc, output_hidden_states=True).hidden_states[-1]
    assert_close(hidden, torch.cat([h[i, :n] for i, n in enumerate(lens)]), what="classifier hidden")


def test_token_type_ids_matter_for_bert(tiny_encoder_factory):
    model_dir = tiny_encoder_factory("BertForSequenceClassification", num_labels=3)
    model = our_model(model_dir)
    enc, ids, tt, lens = tokenize(model_dir, TEXTS[:2], PAIRS[:2])
    with_tt = model.forward_pool(ids, tt, lens, "score")
    without = model.forward_pool(ids, None, lens, "score")
    assert (with_tt - without).abs().max() > 1e-3
    enc["token_type_ids"].zero_()
    assert_close(without, hf_logits(model_dir, enc), what="token_type_ids=None is all zeros")


def test_equal_lengths_single_sequence_and_batch_order(tiny_encoder_factory):
    """Dense path (equal lengths), one sequence, and results independent of batch neighbours."""
    model_dir = tiny_encoder_factory("RobertaModel", sentence_transformers="mean", seed=0)
    model = our_model(model_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 512, (4 * 9,), generator=g)
    together = model.forward_pool(ids, None, [9] * 4, "embed")
    alone = torch.cat([model.forward_pool(ids[i * 9 : (i + 1) * 9], None, [9], "embed") for i in range(4)])
    assert_close(together, alone, atol=1e-5, what="dense batch vs one by one")
    mixed = model.forward_pool(torch.cat([ids[:9], ids[9:12]]), None, [9, 3], "embed")
    assert_close(mixed[0], together[0], atol=1e-5, what="a neighbour does not change a sequence")
    # the classifier's last layer on the [CLS] rows only, on the dense path
    clf_dir = tiny_encoder_factory("BertForSequenceClassification", num_labels=3)
    clf = our_model(clf_dir)
    together = clf.forward_pool(ids, None, [9] * 4, "classify")
    alone = torch.cat([clf.forward_pool(ids[i * 9 : (i + 1) * 9], None, [9], "classify") for i in range(4)])
    assert_close(together, alone, atol=1e-5, what="dense classify batch vs one by one")
    assert_close(together, hf_logits(clf_dir, {"input_ids": ids.view(4, 9)}), what="dense classify vs transformers")


# --------------------------------------------------------------------------- sentence-transformers folders


@pytest.mark.parametrize("mode", ["mean", "cls", "lasttoken", "max"])
@pytest.mark.parametrize("normalize", [True, False])
def test_st_pooling_variants_match_sentence_transformers(tiny_encoder_factory, mode, normalize):
    arch = "RobertaModel" if mode == "lasttoken" else "BertModel"
    model_dir = tiny_encoder_factory(arch, sentence_transformers=mode, normalize=normalize, max_seq_length=24)
    model = our_model(model_dir)
    assert model.pool_config == PoolingConfig(
        mode=mode, normalize=normalize, max_seq_length=24, source="sentence-transformers"
    )
    assert model.pooling.max_input_tokens == 24
    enc, ids, tt, lens = tokenize(model_dir, TEXTS, max_length=24)
    assert max(lens) == 24  # the long text is truncated as ST truncates it
    ours = model.forward_pool(ids, tt, lens, "embed")
    assert_close(ours, st_encode(model_dir, TEXTS, normalize_embeddings=False), what=f"{mode} normalize={normalize}")
    ref = pool(hf_hidden(model_dir, enc, lens), lens, model.pool_config)
    assert_close(ours, ref, what=f"{mode} vs transformers")


def test_read_pooling_config_spellings(tmp_path):
    assert read_pooling_config(tmp_path) is None  # no modules.json
    write_sentence_transformers_files(
        tmp_path, 8, "lasttoken", normalize=False, legacy_keys=False, max_seq_length=7
    )
    cfg = read_pooling_config(tmp_path)
    assert cfg == PoolingConfig(mode="lasttoken", normalize=False, max_seq_length=7, source="sentence-transformers")
    assert not cfg.needs_all_tokens
    # ST 5 spelling with a one-element list, include_prompt, do_lower_case, no Normalize folder on disk
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 8, "pooling_mode": ["max"], "include_prompt": False})
    )
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": True}))
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    cfg = read_pooling_config(tmp_path)
    assert (cfg.mode, cfg.normalize, cfg.max_seq_length, cfg.do_lower_case, cfg.include_prompt) == (
        "max",
        True,
        128,
        True,
        False,
    )
    # legacy booleans, none set: ST's default is mean
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8}))
    assert read_pooling_config(tmp_path).mode == "mean"


@pytest.mark.parametrize(
    "change, message",
    [
        ("dense", "Dense"),
        ("combined", "combined pooling modes"),
        ("unknown_mode", "unknown pooling mode"),
        ("no_pooling_file", "does not exist"),
        ("no_pooling_module", "no Pooling module"),
        ("subfolder", "subfolder"),
    ],
)
def test_read_pooling_config_errors(tmp_path, change, message):
    write_sentence_transformers_files(tmp_path, 8, "mean")
    modules = json.loads((tmp_path / "modules.json").read_text())
    pooling = tmp_path / "1_Pooling" / "config.json"
    if change == "dense":
        modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        modules[-1]["idx"] = 3
    elif change == "combined":
        pooling.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    elif change == "unknown_mode":
        pooling.write_text(json.dumps({"pooling_mode": "median"}))
    elif change == "no_pooling_file":
        pooling.unlink()
    elif change == "no_pooling_module":
        modules = modules[:1]
    elif change == "subfolder":
        modules[0]["path"] = "0_Transformer"
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match=message):
        read_pooling_config(tmp_path)


def test_pool_flat_batch_modes():
    """pool() on a flat batch equals per-sequence reductions, in every mode."""
    g = torch.Generator().manual_seed(0)
    lens = [3, 1, 5]
    x = torch.randn(sum(lens), 6, generator=g)
    parts = torch.split(x, lens)
    expect = {
        "cls": torch.stack([p[0] for p in parts]),
        "lasttoken": torch.stack([p[-1] for p in parts]),
        "mean": torch.stack([p.mean(0) for p in parts]),
        "max": torch.stack([p.amax(0) for p in parts]),
        "mean_sqrt_len_tokens": torch.stack([p.sum(0) / len(p) ** 0.5 for p in parts]),
        "weightedmean": torch.stack(
            [(p * torch.arange(1, len(p) + 1).unsqueeze(1)).sum(0) / sum(range(1, len(p) + 1)) for p in parts]
        ),
    }
    for mode, ref in expect.items():
        assert_close(pool(x, lens, PoolingConfig(mode=mode)), ref, atol=1e-6, what=mode)
        assert_close(pool(x, lens, PoolingConfig(mode=mode, normalize=True)), F.normalize(ref, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="unknown pooling mode"):
        PoolingConfig(mode="median")


# --------------------------------------------------------------------------- the real all-MiniLM-L6-v2

MINILM_TEXTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Two men pushed carts through the woods.",
    "naïve café façade — Ünïcödé résumé",
    "日本語のテキストも埋め込めます。",
    "Привет, как дела? Всё хорошо.",
    "emoji 😀🚀🔥 and symbols ∑∫√ ≠ ≤",
    "UPPER CASE and lower case AND MiXeD",
    "1234567890 3.14159 2026-11-22 $100 50%",
    "def f(x):\n    return x ** 2  # code",
    "   leading and trailing whitespace   ",
    "?",
    "Sentence transformers map sentences to a dense vector space. " * 6,
    "The morning train left the station a little after seven, and the platform emptied. " * 12,
    "word " * 400,  # truncated at max_seq_length (256)
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def test_minilm_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    model = our_model(minilm_dir)
    assert model.pool_config == PoolingConfig(
        mode="mean", normalize=True, max_seq_length=256, source="sentence-transformers"
    )
    assert (model.hidden_size, model.max_position_embeddings, model.uses_token_type_ids) == (384, 512, True)
    enc, ids, tt, lens = tokenize(minilm_dir, MINILM_TEXTS, max_length=model.pooling.max_input_tokens)
    assert max(lens) == 256 and min(lens) <= 3
    ours = model.forward_pool(ids, tt, lens, "embed")
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    assert st.max_seq_length == 256
    ref = torch.as_tensor(st.encode(MINILM_TEXTS, normalize_embeddings=False, convert_to_numpy=True))
    cos = F.cosine_similarity(ours, ref)
    assert cos.min().item() >= 0.9999, cos
    assert_close(ours, ref, atol=1e-5, what="MiniLM vs sentence-transformers")


# --------------------------------------------------------------------------- dtypes and errors


def test_bfloat16_close_to_float32(tiny_encoder_factory):
    emb_dir = tiny_encoder_factory("BertModel", **encoder_kwargs("BertModel"))
    cls_arch = "XLMRobertaForSequenceClassification"
    cls_dir = tiny_encoder_factory(cls_arch, **encoder_kwargs(cls_arch))
    for model_dir, task, pairs in ((emb_dir, "embed", None), (cls_dir, "classify", PAIRS)):
        _, ids, tt, lens = tokenize(model_dir, TEXTS, pairs)
        ref = our_model(model_dir).forward_pool(ids, tt, lens, task)
        bf = our_model(model_dir, torch.bfloat16)
        assert bf.dtype == torch.bfloat16 and bf.word_embeddings.dtype == torch.bfloat16
        out = bf.forward_pool(ids, tt, lens, task)
        assert out.dtype == torch.float32
        if task == "embed":
            assert F.cosine_similarity(out, ref).min() > 0.99
        else:
            assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    # .to() after loading rebuilds the fast path
    model = our_model(emb_dir).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.forward_pool(ids[:5], None, [5], "embed").dtype == torch.float32


def _rewrite_checkpoint(src, dst, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state = edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_and_unexpected_weights_are_named(tiny_encoder_factory, tmp_path):
    src = tiny_encoder_factory("BertForSequenceClassification", num_labels=3)

    def drop(state):
        del state["bert.encoder.layer.1.attention.self.key.bias"]
        state["bert.encoder.layer.9.surprise.weight"] = torch.zeros(2)
        return state

    bad = _rewrite_checkpoint(src, tmp_path / "bad", drop)
    with pytest.raises(CheckpointError) as err:
        our_model(bad)
    assert "encoder.layer.1.attention.self.key.bias" in str(err.value)
    assert "missing" in str(err.value) and "surprise" in str(err.value)

    def no_head(state):
        return {k: v for k, v in state.items() if not k.startswith("classifier.")}

    with pytest.raises(CheckpointError, match="classifier.weight"):
        our_model(_rewrite_checkpoint(src, tmp_path / "nohead", no_head))


def test_prefixed_checkpoint_with_pretraining_heads_loads(tiny_encoder_factory, tmp_path):
    """A BertModel checkpoint saved from BertForPreTraining: ``bert.`` prefix, ``cls.`` heads, position_ids."""
    src = tiny_encoder_factory("BertModel", **encoder_kwargs("BertModel"))

    def as_pretraining(state):
        out = {"bert." + k: v for k, v in state.items()}
        out["cls.predictions.bias"] = torch.zeros(512)
        out["bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
        # legacy LayerNorm names
        out["bert.embeddings.LayerNorm.gamma"] = out.pop("bert.embeddings.LayerNorm.weight")
        out["bert.embeddings.LayerNorm.beta"] = out.pop("bert.embeddings.LayerNorm.bias")
        return out

    other = _rewrite_checkpoint(src, tmp_path / "pre", as_pretraining)
    _, ids, tt, lens = tokenize(src, TEXTS)
    assert torch.equal(
        our_model(other).forward_pool(ids, tt, lens, "embed"), our_model(src).forward_pool(ids, tt, lens, "embed")
    )


def test_shape_mismatch_with_config_is_named(tiny_encoder_factory, tmp_path):
    src = tiny_encoder_factory("RobertaModel")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"intermediate.dense.weight \(128, 64\) \(expected \(96, 64\)\)"):
        our_model(dst)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"hidden_act": "gelu_10"}, "unsupported hidden_act"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"is_decoder": True}, "decoder"),
        ({"architectures": ["BertForMaskedLM"]}, "unsupported architectures"),
    ],
)
def test_unsupported_configs_are_clear_errors(tiny_encoder_factory, tmp_path, override, message):
    src = tiny_encoder_factory("BertModel")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(override)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        our_model(dst)


def test_bad_calls_are_clear_errors(tiny_encoder_factory):
    model = our_model(tiny_encoder_factory("BertModel"))
    ids = torch.randint(5, 512, (10,))
    with pytest.raises(ValueError, match="no classification head"):
        model.forward_pool(ids, None, [10], "classify")
    with pytest.raises(ValueError, match="unknown task"):
        model.forward_pool(ids, None, [10], "generate")
    with pytest.raises(ValueError, match="seq_lens sum to 9"):
        model.forward_pool(ids, None, [4, 5], "embed")
    with pytest.raises(ValueError, match="at least one token"):
        model.forward_pool(ids, None, [10, 0], "embed")
    with pytest.raises(ValueError, match="exceeds the model's maximum of 512"):
        model.forward_pool(torch.randint(5, 512, (513,)), None, [513], "embed")


# --------------------------------------------------------------------------- the tiny encoder builder


def _hashes(directory):
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "XLMRobertaModel"])
def test_build_tiny_encoder_is_deterministic(tmp_path, arch):
    from patchbay_plugins.tinymodels import build_tiny_encoder

    kwargs = dict(arch=arch, sentence_transformers="cls", num_labels=2)
    a = _hashes(build_tiny_encoder(tmp_path / "a", **kwargs))
    b = _hashes(build_tiny_encoder(tmp_path / "b", **kwargs))
    assert a == b
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"} <= set(a)
    c = _hashes(build_tiny_encoder(tmp_path / "c", **{**kwargs, "seed": 1}))
    assert c["tokenizer.json"] == a["tokenizer.json"] and c["model.safetensors"] != a["model.safetensors"]


def test_tiny_encoder_tokenizers(tiny_encoder_factory):
    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(tiny_encoder_factory("BertModel"))
    enc = bert("Hello there", "the train")
    tokens = bert.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2 and tokens[-1] == "[SEP]"
    first_sep = tokens.index("[SEP]")
    assert enc["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
    assert (bert.pad_token_id, bert.unk_token, bert.mask_token, len(bert)) == (0, "[UNK]", "[MASK]", 512)

    roberta = AutoTokenizer.from_pretrained(tiny_encoder_factory("XLMRobertaModel"))
    enc = roberta("Hello there", "the train")
    tokens = roberta.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "<s>" and tokens[-1] == "</s>" and "</s></s>" in "".join(tokens)
    assert "token_type_ids" not in enc
    assert (roberta.pad_token_id, roberta.bos_token_id, roberta.eos_token_id) == (1, 0, 2)
    assert roberta.model_max_length == 512


def test_cached_encoder_reuses_and_keeps_cached_model_keys(tmp_path):
    from patchbay_plugins import tinymodels

    a = tinymodels.cached_encoder("e", {"arch": "BertModel"}, cache_root=tmp_path)
    b = tinymodels.cached_encoder("e", {"arch": "BertModel"}, cache_root=tmp_path)
    assert a == b and (a / "config.json").is_file()
    # the same name and kwargs with the default builder is a different cache entry
    assert tinymodels.cache_key("e", {"arch": "BertModel"}) != tinymodels.cache_key(
        "e", {"arch": "BertModel"}, tinymodels.build_tiny_encoder
    )
    assert tinymodels.cache_key("e", {}) == tinymodels.cache_key("e", {}, tinymodels.build_tiny_model)
