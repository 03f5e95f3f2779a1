"""Fixtures of the Ray package's tests: the same cached tiny models patchbay's own tests build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cache_root() -> Path:
    return Path(os.environ.get("PATCHBAY_TEST_CACHE") or Path.home() / ".cache" / "patchbay-tests") / "models"


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    from patchbay_plugins.tinymodels import cached_model

    return cached_model("tiny-llama", {"arch": "LlamaForCausalLM"}, cache_root=_cache_root())


@pytest.fixture(scope="session")
def tiny_encoder() -> Path:
    from patchbay_plugins.tinymodels import cached_encoder

    return cached_encoder("tiny-enc-bertmodel", {"arch": "BertModel"}, cache_root=_cache_root())
