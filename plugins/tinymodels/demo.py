"""The "demo" plugin: the model ``serve`` runs when given none — tiny, random, built on first use, cached.

Its answers are gibberish; it exists so that the first command in the README works on a
fresh machine with no model at hand. Without this plugin (``--plugins`` leaving it out),
``serve`` needs a model directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from patchbay import hookimpl
from patchbay.registry import DefaultModel

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
    done = subprocess.run([sys.executable, "-m", "patchbay_plugins.tinymodels.demo"], check=True,
                          stdout=subprocess.PIPE, text=True)
    return Path(done.stdout.strip().splitlines()[-1])


@hookimpl(trylast=True)
def default_model() -> DefaultModel:
    return DefaultModel(path=demo_model_dir_in_child(), name=DEMO_NAME, what="the bundled demo model")


if __name__ == "__main__":
    print(demo_model_dir())
