"""The demo chat model ``serve`` runs when given no model: tiny, random, built on first use, cached."""

from __future__ import annotations

from pathlib import Path

DEMO_NAME = "patchbay-demo"


def demo_model_dir() -> Path:
    from patchbay.tinymodels import cached_model, demo_model_config

    return cached_model("demo", demo_model_config())
