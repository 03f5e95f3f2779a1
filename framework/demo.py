"""The demo chat model ``serve`` runs when given no model: tiny, random, built on first use, cached."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO_NAME = "patchbay-demo"


def demo_model_dir() -> Path:
    from patchbay_plugins.tinymodels import cached_model, demo_model_config

    return cached_model("demo", demo_model_config())


def demo_model_dir_in_child() -> Path:
    """:func:`demo_model_dir`, run in a child process (building the model there if it is missing).

    ``serve``'s main process forks Granian's worker. Building the model runs torch ops, which
    start libgomp's thread pool, and libgomp's pool does not survive a fork: the worker then
    hangs in its first parallel region. So the main process never builds the model itself.
    """
    done = subprocess.run([sys.executable, "-m", "patchbay.demo"], check=True, stdout=subprocess.PIPE, text=True)
    return Path(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(demo_model_dir())
