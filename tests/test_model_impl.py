"""Which family serves a model: ``--model-impl auto|native|vllm|transformers``, fallback families in the
registry, the refusals that stop start-up (an architecture transformers does not know, an attention option the
fallback cannot honour) and a native family handing a checkpoint it refuses to the fallback."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from apikit import api_client
from patchbay.config import ConfigError, ServerConfig
from patchbay.loader import pick_family
from patchbay.model import LoadRequest
from patchbay.plugins import load_plugins
from patchbay.registry import ModelFamily, Registries, StartupError
from patchbay_plugins.models import fallback
from patchbay_plugins.models.fallback.attention import UnsupportedAttention
from patchbay_plugins.models.fallback.causal import TransformersCausalModel
from serverkit import run_serve

torch.set_num_threads(1)


def edited(model_dir: Path, tmp_path: Path, **changes) -> Path:
    """A copy of ``model_dir`` whose config.json has ``changes``."""
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def load(model_dir: Path, task: str = "generate"):
    from transformers import AutoConfig

    return fallback.load(LoadRequest(model_dir=model_dir, hf_config=AutoConfig.from_pretrained(model_dir), task=task,
                                     dtype=torch.float32, device=torch.device("cpu")))


# --------------------------------------------------------------------------- the registry


def _families():
    native = ModelFamily(name="mine", architectures=("MineForCausalLM",), tasks=frozenset({"generate"}), load=print)
    other = ModelFamily(name="other-impl", architectures=("MineForCausalLM",), tasks=frozenset({"embed"}), load=print,
                        impl="elsewhere")
    fb = ModelFamily(name="fb", architectures=(), tasks=frozenset({"generate", "embed"}), load=print, impl="elsewhere",
                     runs=lambda arch, task: arch.endswith("ForCausalLM"))
    reg = Registries()
    for fam in (native, other, fb):
        reg.family_registrar(fam.name)(fam)
    return reg, native, other, fb


def test_family_for_by_impl():
    reg, native, other, fb = _families()
    assert reg.family_for(["MineForCausalLM"], "generate") is native
    assert reg.family_for(["MineForCausalLM"], "generate", "native") is native
    assert reg.family_for(["MineForCausalLM"], "generate", "vllm") is native
    assert reg.family_for(["MineForCausalLM"], "generate", "elsewhere") is fb  # the listed one is native
    assert reg.family_for(["MineForCausalLM"], "embed", "elsewhere") is other  # a listed family wins
    assert reg.family_for(["YoursForCausalLM"], "generate") is fb
    assert reg.family_for(["YoursForCausalLM"], "generate", "native") is None
    assert reg.family_for(["YoursModel"], "generate") is None
    assert reg.tasks_for(["YoursForCausalLM"]) == ["generate", "embed"]
    assert reg.tasks_for(["MineForCausalLM"], "native") == ["generate"]
    assert reg.impls() == ["native", "elsewhere"]


def test_a_fallback_registered_twice_names_both_plugins():
    reg, *_ = _families()
    twin = ModelFamily(name="fb", architectures=(), tasks=frozenset({"generate"}), load=print, runs=lambda a, t: True)
    with pytest.raises(StartupError, match="fallback family 'fb/generate' is registered twice: by 'fb' and by 'twin'"):
        reg.family_registrar("twin")(twin)


@pytest.mark.parametrize("word", ["auto", "vllm", ""])
def test_a_family_cannot_take_a_model_impl_keyword(word):
    with pytest.raises(StartupError, match="impl"):
        ModelFamily(name="x", architectures=(), tasks=frozenset({"generate"}), load=print, impl=word)


def test_the_plugin_imports_light_and_registers_a_fallback():
    import subprocess
    import sys

    code = ("import sys; import patchbay_plugins.models.fallback as m; fams = []; m.register_model_families("
            "fams.append); f = fams[0]; assert (f.name, f.impl, f.architectures) == ('transformers', 'transformers', "
            "()) and f.runs is not None; assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runs_reads_transformers_lists_without_importing_torch():
    """serve's main process asks ``runs`` before it forks the worker: no torch there."""
    import subprocess
    import sys

    code = ("import sys; from patchbay_plugins.models.fallback import support; "
            "assert support.runs('Gemma2ForCausalLM', 'generate') and not support.runs('BertModel', 'generate'); "
            "assert 'torch' not in sys.modules, 'runs imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from transformers.models.auto import modeling_auto

    from patchbay_plugins.models.fallback import support

    for name, mapping in support.mapping_names().items():
        assert mapping == dict(getattr(modeling_auto, name)), name


def test_runs_follows_transformers_auto_classes():
    assert fallback.runs("Gemma2ForCausalLM", "generate") and fallback.runs("LlamaForCausalLM", "generate")
    assert fallback.runs("Gemma2ForCausalLM", "embed")  # a decoder used as an embedder
    assert fallback.runs("ModernBertModel", "embed") and not fallback.runs("ModernBertModel", "generate")
    assert fallback.runs("ModernBertForSequenceClassification", "classify")
    assert fallback.runs("ModernBertForSequenceClassification", "score")
    assert not fallback.runs("NoSuchModelForCausalLM", "generate") and not fallback.runs("Gemma2ForCausalLM", "xyz")


# --------------------------------------------------------------------------- choosing, at start-up


def test_auto_picks_native_else_the_fallback_and_says_so(tiny_llama, tiny_model_factory, caplog):
    caplog.set_level(logging.INFO, logger="patchbay.loader")
    with api_client(tiny_llama) as c:
        assert type(c.model.engine.runner.model).__name__ == "LlamaFamilyModel"
    with api_client(tiny_model_factory("MixtralForCausalLM")) as c:
        assert isinstance(c.model.engine.runner.model, TransformersCausalModel)
    logs = [r.getMessage() for r in caplog.records if r.name == "patchbay.loader"]
    assert any("LlamaForCausalLM, family llama [native implementation, --model-impl auto]" in m for m in logs), logs
    assert any("MixtralForCausalLM, family transformers [transformers implementation, --model-impl auto]" in m
               for m in logs), logs


def test_model_impl_native_refuses_an_architecture_only_the_fallback_runs(tiny_model_factory):
    registries = load_plugins().build_registries()
    model_dir = tiny_model_factory("Gemma2ForCausalLM")
    for word in ("native", "vllm"):
        with pytest.raises(ConfigError, match=r"no loaded model family runs \['Gemma2ForCausalLM'\] for task "
                                              rf"'generate' with --model-impl {word}; registered: .*LlamaForCausalLM"):
            pick_family(model_dir, registries, config=ServerConfig(model=str(model_dir), model_impl=word))
    with pytest.raises(ConfigError, match=r"--model-impl: no loaded model family implements 'terratorch'; "
                                          r"implementations: auto, native, transformers"):
        pick_family(model_dir, registries, config=ServerConfig(model=str(model_dir), model_impl="terratorch"))
    with pytest.raises(ConfigError, match="--model-impl"):
        ServerConfig(model_impl="Not A Word").validate()


def test_serve_refuses_an_architecture_transformers_does_not_know(tiny_llama, tmp_path):
    model_dir = edited(tiny_llama, tmp_path, architectures=["NoSuchModelForCausalLM"])
    out = run_serve([str(model_dir)])
    assert out.returncode != 0
    assert "NoSuchModelForCausalLM" in out.stderr and "LlamaForCausalLM" in out.stderr
    assert "the transformers family (the architectures it claims for this task)" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_serve([str(tiny_llama), "--model-impl", "terratorch"])
    assert out.returncode != 0 and "--model-impl" in out.stderr and "terratorch" in out.stderr


def test_a_checkpoint_the_native_family_refuses_goes_to_the_fallback(tiny_model_factory, caplog):
    """A Llama folder with an activation the llama family does not implement: auto serves it through
    transformers (with a warning naming why); --model-impl native refuses it."""
    model_dir = tiny_model_factory("LlamaForCausalLM", hidden_act="gelu_pytorch_tanh")
    caplog.set_level(logging.WARNING, logger="patchbay.loader")
    with api_client(model_dir) as c:
        assert isinstance(c.model.engine.runner.model, TransformersCausalModel)
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200
    assert any("the llama family cannot load" in r.getMessage() and "hidden_act" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="hidden_act"):
        with api_client(model_dir, model_impl="native"):
            pass


# --------------------------------------------------------------------------- what the fallback cannot honour


def test_an_attention_option_it_cannot_honour_stops_startup_naming_it(tmp_path):
    """GPT-OSS hands its attention sinks to the attention function as ``s_aux``."""
    from patchbay_plugins.tinymodels.tokenizers import save_chat_tokenizer
    from patchbay_plugins.tinymodels.weights import write_config_and_weights

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                 max_position_embeddings=256)
    write_config_and_weights(tmp_path, "GptOssForCausalLM", "GptOssConfig", sizes, dtype=torch.float32, seed=0,
                             shards=1)
    save_chat_tokenizer(tmp_path, 512, 256, None)
    with pytest.raises(UnsupportedAttention, match="GptOssAttention passes the attention option 's_aux'"):
        load(tmp_path)


@pytest.mark.parametrize("arch,changes,message", [
    ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, "Gemma3Attention is not causal"),
    ("Gemma2ForCausalLM", {"layer_types": ["sliding_attention", "linear_attention"]},
     r"layer_types \['linear_attention'\] are not attention over a KV cache"),
    ("LlamaForCausalLM", {"attention_chunk_size": 8}, "the config option attention_chunk_size=8 cannot be honoured"),
], ids=["bidirectional", "linear-attention-layers", "chunked-attention"])
def test_config_options_it_cannot_honour_stop_startup_naming_them(arch, changes, message, tiny_model_factory,
                                                                  tmp_path):
    with pytest.raises(UnsupportedAttention, match=message):
        load(edited(tiny_model_factory(arch), tmp_path, **changes))


def test_missing_weights_are_refused_not_initialised_at_random(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = edited(tiny_model_factory("Olmo2ForCausalLM"), tmp_path)
    path = next(model_dir.glob("*.safetensors"))
    state = load_file(path)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.mlp\.down_proj\.weight"):
        load(model_dir)


# --------------------------------------------------------------------------- beside the native speech and vision families


@pytest.mark.parametrize("fixture,arch,family", [("tiny_whisper", "WhisperForConditionalGeneration", "whisper"),
                                                 ("tiny_llava", "LlavaForConditionalGeneration", "llava"),
                                                 ("tiny_clip", "CLIPModel", "clip")])
def test_speech_and_vision_folders_are_native_and_refused_by_the_fallback(fixture, arch, family, request):
    """auto picks the native family; ``--model-impl transformers`` on them is a start-up error naming the
    architecture (the fallback serves text alone: it claims neither Whisper, nor Llava, nor CLIP's towers)."""
    model_dir = request.getfixturevalue(fixture)
    registries = load_plugins().build_registries()
    assert pick_family(model_dir, registries, config=ServerConfig(model=str(model_dir))).name == family
    out = run_serve([str(model_dir), "--model-impl", "transformers"])
    assert out.returncode != 0
    assert f"no loaded model family runs ['{arch}']" in out.stderr and "--model-impl transformers" in out.stderr
    assert "Traceback" not in out.stderr


def test_runs_claims_encoders_of_text_alone():
    for arch in ("ModernBertModel", "NomicBertModel", "BertModel", "Qwen3Model"):
        assert fallback.runs(arch, "embed"), arch
    for arch in ("CLIPModel", "CLIPTextModel", "WhisperModel", "LlavaModel", "ViTModel", "T5Model"):
        assert not any(fallback.runs(arch, task) for task in fallback.TASKS), arch
    assert fallback.runs("Qwen2ForSequenceClassification", "score")
    assert not fallback.runs("T5ForSequenceClassification", "classify")  # an encoder-decoder


def test_an_encoder_that_does_not_run_on_text_alone_stops_startup(tiny_clip, monkeypatch):
    """What ``runs`` would let through by mistake is still refused at load, by one text-only forward."""
    from patchbay_plugins.models.fallback import support

    monkeypatch.setattr(support, "runs", lambda arch, task: True)
    with pytest.raises(ValueError, match="CLIPModel: transformers' CLIPModel does not run on text alone"):
        load(tiny_clip, task="embed")
