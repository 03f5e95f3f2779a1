"""The tiny model builder: deterministic, complete, loadable offline."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from patchbay_plugins import tinymodels
from patchbay.weights import iter_safetensors

torch.set_num_threads(1)


def _hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("kwargs", [{}, {"arch": "Qwen2ForCausalLM", "shards": 2, "tie_word_embeddings": True}])
def test_build_is_deterministic(tmp_path, kwargs):
    a = tinymodels.build_tiny_model(tmp_path / "a", **kwargs)
    b = tinymodels.build_tiny_model(tmp_path / "b", **kwargs)
    ha, hb = _hashes(a), _hashes(b)
    assert ha == hb
    assert "tokenizer.json" in ha
    assert any(name.endswith(".safetensors") for name in ha)
    # a different seed changes the weights but not the tokenizer
    c = tinymodels.build_tiny_model(tmp_path / "c", **{**kwargs, "seed": 1})
    hc = _hashes(c)
    assert hc["tokenizer.json"] == ha["tokenizer.json"]
    assert {k: v for k, v in hc.items() if k.endswith(".safetensors")} != {
        k: v for k, v in ha.items() if k.endswith(".safetensors")
    }


def test_tokenizer_vocab_is_exact_and_every_id_decodes(tiny_llama):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = AutoConfig.from_pretrained(tiny_llama)
    assert len(tok) == cfg.vocab_size == 512
    special = set(tok.all_special_ids)
    assert {tok.convert_tokens_to_ids(t) for t in tinymodels.SPECIAL_TOKENS} == special
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token is not None
    for i in range(len(tok)):
        text = tok.decode([i], skip_special_tokens=True)
        assert (text == "") == (i in special), (i, text)
    # ordinary text round-trips
    text = "The morning train left the station, and Maria opened her notebook 42 times!"
    assert tok.decode(tok(text).input_ids) == text


def test_large_vocab_reaches_exact_size():
    """The benchmark's 8000-id vocabulary is reached without padding tokens."""
    tok = tinymodels.train_tokenizer(8000)
    assert tok.get_vocab_size() == 8000
    assert not any(t.startswith("<unused") for t in tok.get_vocab())


def test_chat_template_and_generation_config(tiny_llama):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    gen = GenerationConfig.from_pretrained(tiny_llama)
    assert gen.eos_token_id == [tok.convert_tokens_to_ids("</s>"), tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("arch", tinymodels.ARCHITECTURES)
def test_loads_offline_with_transformers(tiny_model_factory, arch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"head_dim": 32} if arch == "Qwen3ForCausalLM" else {}
    model_dir = tiny_model_factory(arch, **kwargs)
    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.architectures == [arch]
    assert AutoTokenizer.from_pretrained(model_dir) is not None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert type(model).__name__ == arch
    with torch.inference_mode():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, 512)
    assert logits.std() > 0.3  # not degenerate
    names = dict(iter_safetensors(model_dir))
    if arch == "Qwen2ForCausalLM":
        assert names["model.layers.0.self_attn.q_proj.bias"].abs().min() > 0
    if arch == "Qwen3ForCausalLM":
        assert cfg.head_dim == 32
        qn = names["model.layers.0.self_attn.q_norm.weight"]
        assert qn.shape == (32,) and not torch.allclose(qn, torch.ones_like(qn))


def test_sharded_index_covers_every_tensor(tiny_model_factory):
    model_dir = tiny_model_factory("LlamaForCausalLM", shards=3)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    names = [n for n, _ in iter_safetensors(model_dir)]
    assert sorted(names) == sorted(index["weight_map"])
    total = sum(t.numel() * t.element_size() for _, t in iter_safetensors(model_dir))
    assert index["metadata"]["total_size"] == total


def test_bfloat16_checkpoint(tiny_model_factory):
    model_dir = tiny_model_factory("LlamaForCausalLM", dtype="bfloat16")
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for _, t in iter_safetensors(model_dir)} == {torch.bfloat16}


def test_cached_model_builds_once(tmp_path):
    a = tinymodels.cached_model("t", {"vocab_size": 300, "num_layers": 1}, cache_root=tmp_path)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    b = tinymodels.cached_model("t", {"vocab_size": 300, "num_layers": 1}, cache_root=tmp_path)
    assert a == b and (b / "model.safetensors").stat().st_mtime_ns == mtime
    c = tinymodels.cached_model("t", {"vocab_size": 300, "num_layers": 2}, cache_root=tmp_path)
    assert c != a and c.name.startswith("t-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, c.name])  # no temp dirs left


def test_named_model_configs():
    bench = tinymodels.benchmark_model_config()
    assert (bench["hidden_size"], bench["num_layers"], bench["num_heads"], bench["num_kv_heads"]) == (512, 8, 8, 8)
    assert (bench["intermediate_size"], bench["vocab_size"], bench["dtype"]) == (1408, 8000, "float32")
    demo = tinymodels.demo_model_config()
    assert demo["arch"] == "LlamaForCausalLM" and demo["vocab_size"] == 4096


def test_cache_key_covers_every_builder_source_and_the_corpus():
    from patchbay_plugins.tinymodels import cache

    sources = cache.builder_sources()
    assert {"tokenizers.py", "weights.py", "decoders.py", "encoders.py", "cache.py", "tiny_corpus.txt"} <= {
        p.name for p in sources
    }
    assert all(p.is_file() for p in sources)
