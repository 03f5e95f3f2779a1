"""Tiny decoders with random weights — the llama family's (Llama, Mistral, Qwen2, Qwen3) and those of
:data:`~patchbay_plugins.tinymodels.zoo.FALLBACK_ARCHITECTURES` — and the named models.

:func:`build_tiny_model` writes a complete HF model folder (``config.json``,
safetensors weights, ``generation_config.json``, a byte-level BPE tokenizer, a
ChatML chat template) that ``transformers.AutoTokenizer`` /
``AutoModelForCausalLM`` load offline. :func:`build_demo_model` is the chat
model ``serve`` runs when given none; :func:`build_benchmark_model` is the
~34M-parameter model benchmarks use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .tokenizers import BOS, DEFAULT_CHAT_TEMPLATE, EOS, IM_END, PAD, SPECIAL_TOKENS, save_chat_tokenizer
from .weights import prepare_folder, size_config, write_config_and_weights
from .zoo import FALLBACK_ARCHITECTURES, FALLBACK_QK_GAIN, fallback_config

#: architecture -> transformers config class name
ARCHITECTURES = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
}


# --------------------------------------------------------------------------- configs of the named models


def _named_llama(**sizes: Any) -> dict[str, Any]:
    """Builder arguments of a named model: a Llama of ``sizes`` with 4096 positions, seed 0."""
    return dict(arch="LlamaForCausalLM", **sizes, max_position_embeddings=4096, seed=0)


def demo_model_config() -> dict[str, Any]:
    """Builder arguments of the demo chat model ``serve`` runs when given no model."""
    return _named_llama(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704, vocab_size=4096, dtype="float32"
    )


def benchmark_model_config(dtype: str = "float32") -> dict[str, Any]:
    """Builder arguments of the benchmark model (~34M parameters)."""
    return _named_llama(
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1408, vocab_size=8000, dtype=dtype
    )


def build_demo_model(directory: str | os.PathLike) -> Path:
    return build_tiny_model(directory, **demo_model_config())


def build_benchmark_model(directory: str | os.PathLike, dtype: str = "float32") -> Path:
    return build_tiny_model(directory, **benchmark_model_config(dtype))


# --------------------------------------------------------------------------- the builder


def build_tiny_model(
    directory: str | os.PathLike,
    arch: str = "LlamaForCausalLM",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    shards: int = 1,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    head_dim: int | None = None,
    added_tokens: tuple[str, ...] | list[str] = (),
    qk_gain: float | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a complete HF model folder with random weights into ``directory``; return its path.

    ``arch`` is one of :data:`ARCHITECTURES` (the llama family) or of
    :data:`~patchbay_plugins.tinymodels.zoo.FALLBACK_ARCHITECTURES`, whose
    particular config values (windows, soft-caps, multipliers) are applied first.
    ``config_overrides`` go to the transformers config class as they are
    (e.g. ``rope_parameters``, ``attention_bias``, ``rms_norm_eps``,
    ``sliding_window``). ``added_tokens`` join the vocabulary's end as ordinary added tokens (tool and
    reasoning markup, e.g. :data:`.tokenizers.TOOL_TOKENS`). ``initializer_range`` defaults to
    ``hidden_size ** -0.5`` so that attention and logits are far from uniform;
    ``qk_gain`` scales the query / key projections on top (default 1, and
    ``FALLBACK_QK_GAIN`` for the fallback architectures) so that attention is sharp.
    """
    from transformers import GenerationConfig

    if arch in ARCHITECTURES:
        config_class, arch_values = ARCHITECTURES[arch], {}
    elif arch in FALLBACK_ARCHITECTURES:
        config_class, arch_values = fallback_config(arch)
        qk_gain = FALLBACK_QK_GAIN if qk_gain is None else qk_gain
    else:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHITECTURES) + sorted(FALLBACK_ARCHITECTURES)}")
    directory, torch_dtype = prepare_folder(directory, dtype)

    special_ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    eos_ids = [special_ids[EOS], special_ids[IM_END]]
    kwargs = size_config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
    )
    kwargs.update(
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=special_ids[BOS],
        eos_token_id=eos_ids,
        pad_token_id=special_ids[PAD],
    )
    kwargs.update(arch_values)
    kwargs.update(config_overrides)
    write_config_and_weights(directory, arch, config_class, kwargs, dtype=torch_dtype, seed=seed, shards=shards,
                             qk_gain=qk_gain or 1.0)
    GenerationConfig(bos_token_id=special_ids[BOS], eos_token_id=eos_ids, pad_token_id=special_ids[PAD]).save_pretrained(
        str(directory)
    )
    save_chat_tokenizer(directory, vocab_size, max_position_embeddings, chat_template, tuple(added_tokens))
    return directory
