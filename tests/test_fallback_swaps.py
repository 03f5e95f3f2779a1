"""Layers the transformers fallback swaps for patchbay kernels: only where they agree with the original, and a
swap that would change the model is caught (by its own check, and failing that by the start-up self-check)."""

from __future__ import annotations

import pytest
import torch

from patchbay.model import LoadRequest
from patchbay_plugins.models import fallback
from patchbay_plugins.models.fallback import causal, swaps
from patchbay_plugins.models.fallback.attention import UnsupportedAttention

torch.set_num_threads(1)


def load(model_dir):
    from transformers import AutoConfig

    return fallback.load(LoadRequest(model_dir=model_dir, hf_config=AutoConfig.from_pretrained(model_dir),
                                     task="generate", dtype=torch.float32, device=torch.device("cpu")))


def kinds(model) -> set[str]:
    return {type(m).__name__ for m in model.hf_model.modules()}


def test_llama_style_layers_are_swapped_and_the_lm_head_with_them(tiny_llama):
    model = load(tiny_llama)
    assert model.swapped == {"FastGatedMLP": 2, "FastLinear": 9, "FastRMSNorm": 5}  # 2 layers; q, k, v, o, lm_head
    assert not {"LlamaRMSNorm", "LlamaMLP"} & kinds(model) and isinstance(model.lm_head, swaps.FastLinear)
    assert model.num_parameters == sum(p.numel() for p in model.hf_model.parameters()) > 0


def test_look_alikes_that_compute_something_else_are_kept(tiny_model_factory):
    """Gemma's RMSNorm has a 1-D weight and an eps, but scales by 1 + weight: it stays transformers' own."""
    model = load(tiny_model_factory("Gemma2ForCausalLM"))
    assert model.swapped["Gemma2RMSNorm kept"] == 9 and "FastRMSNorm" not in model.swapped
    assert "Gemma2RMSNorm" in kinds(model)


def test_gpt2_conv1d_is_swapped_with_its_weight_transposed(tiny_model_factory):
    model = load(tiny_model_factory("GPT2LMHeadModel"))
    assert model.swapped == {"FastLinear": 9} and "Conv1D" not in kinds(model)


def test_a_replacement_that_disagrees_is_not_swapped(tiny_llama, monkeypatch):
    monkeypatch.setattr(swaps.FastRMSNorm, "forward", lambda self, x: x)
    model = load(tiny_llama)
    assert model.swapped["LlamaRMSNorm kept"] == 5 and "FastRMSNorm" not in model.swapped


def test_a_wrong_swap_that_slips_through_fails_the_startup_self_check(tiny_llama, monkeypatch):
    monkeypatch.setattr(swaps.FastRMSNorm, "forward", lambda self, x: x * 1.01)
    monkeypatch.setattr(swaps, "_agrees", lambda *a: True)
    with pytest.raises(UnsupportedAttention, match="self-check failed"):
        load(tiny_llama)


def test_swaps_can_be_turned_off(tiny_llama, monkeypatch):
    monkeypatch.setattr(causal, "SWAP_LAYERS", False)
    model = load(tiny_llama)
    assert model.swapped == {} and "LlamaRMSNorm" in kinds(model)
