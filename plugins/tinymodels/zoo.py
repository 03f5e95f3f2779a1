"""Tiny decoders of architectures no native family runs (served by the transformers fallback).

Each entry names the transformers config class and the config values that make
the architecture's own attention and logit options *matter* in a tiny random
model: a sliding window shorter than the long test prompts, soft-caps well inside
the range the scores and logits take, scales and multipliers far from their
defaults. Together with the builder's ``qk_gain`` (query / key projections
scaled up, so attention is sharp rather than nearly uniform), a wrong scale, cap
or window changes the greedy text — which is what lets the tests see attention
bugs at all.

Sizes follow :func:`~patchbay_plugins.tinymodels.decoders.build_tiny_model`'s
arguments (hidden 64, 2 layers, 4 heads, ...); the entries only add what is
particular to the architecture.
"""

from __future__ import annotations

from typing import Any

#: the q/k gain every fallback test model is built with (see the module docstring)
FALLBACK_QK_GAIN = 2.0

#: architecture -> (transformers config class name, config values particular to it)
FALLBACK_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    # sliding window on every other layer, attention and final-logit soft-capping, its own query scale
    "Gemma2ForCausalLM": ("Gemma2Config", dict(
        sliding_window=12, attn_logit_softcapping=4.0, final_logit_softcapping=3.0, query_pre_attn_scalar=64)),
    # a sliding and a full layer (each with its own rope base), q/k norms, its own query scale
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(
        sliding_window=12, query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"])),
    # fused qkv and gate_up projections, a sliding window on every layer
    "Phi3ForCausalLM": ("Phi3Config", dict(sliding_window=12)),
    # partial rotary, parallel residual, LayerNorm with biases, fused qkv
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict(rotary_pct=0.5, use_parallel_residual=True)),
    # attention, embedding, residual multipliers and a logits divisor
    "GraniteForCausalLM": ("GraniteConfig", dict(
        attention_multiplier=0.5, embedding_multiplier=3.0, residual_multiplier=0.6, logits_scaling=0.5)),
    # q/k RMSNorm over whole projections, norms after attention and MLP
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    # partial rotary, LayerNorm, per-head q/k LayerNorm, qkv bias
    "StableLmForCausalLM": ("StableLmConfig", dict(partial_rotary_factor=0.5, qk_layernorm=True, use_qkv_bias=True)),
    # learned absolute positions, Conv1D projections, tied embeddings
    "GPT2LMHeadModel": ("GPT2Config", dict(n_inner=128, activation_function="gelu_new", tie_word_embeddings=True)),
    # mixture of experts (top-2 of 4) with a sliding window
    "MixtralForCausalLM": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=12)),
    # mixture of experts (top-2 of 4) with q/k norms
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16, norm_topk_prob=True)),
}

#: what each entry exercises, for the README's list of architectures known to work
FEATURES: dict[str, str] = {
    "Gemma2ForCausalLM": "sliding window on alternate layers, attention and final-logit soft-capping",
    "Gemma3ForCausalLM": "per-layer sliding / full attention, local rope base, q/k norms",
    "Phi3ForCausalLM": "fused projections, sliding window",
    "GPTNeoXForCausalLM": "partial rotary, parallel residual",
    "GraniteForCausalLM": "attention / embedding / residual multipliers, logits scaling",
    "Olmo2ForCausalLM": "q/k norms, post-norms",
    "StableLmForCausalLM": "partial rotary, q/k LayerNorm, qkv bias",
    "GPT2LMHeadModel": "absolute positions, Conv1D projections",
    "MixtralForCausalLM": "mixture of experts, sliding window",
    "Qwen3MoeForCausalLM": "mixture of experts, q/k norms",
}


#: encoders no native family runs (built with the BERT WordPiece tokenizer: [CLS] 2, [SEP] 3)
_MODERNBERT = dict(cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3, local_attention=8,
                   global_attn_every_n_layers=2)
FALLBACK_ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    # rotary positions, alternating global and local (windowed) attention, GeGLU
    "ModernBertModel": ("ModernBertConfig", _MODERNBERT),
    "ModernBertForSequenceClassification": ("ModernBertConfig", _MODERNBERT),
    # rotary positions, SwiGLU (NomicBERT)
    "NomicBertModel": ("NomicBertConfig", {}),
}


def fallback_config(arch: str) -> tuple[str, dict[str, Any]]:
    """``(config class name, config values)`` of a fallback architecture or encoder (a copy: callers may
    change it)."""
    config_class, values = FALLBACK_ARCHITECTURES.get(arch) or FALLBACK_ENCODERS[arch]
    return config_class, dict(values)
