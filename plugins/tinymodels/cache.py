"""Build a tiny model once into ``~/.cache/patchbay/models`` and reuse it, keyed by everything that shapes it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from patchbay_plugins.models import sentence_transformers

from .decoders import build_tiny_model
from .encoders import build_tiny_encoder
from .vision import build_tiny_clip, build_tiny_llava
from .tokenizers import CORPUS_FILE

#: Bump when the output of the builder changes for the same arguments.
BUILDER_VERSION = 1


def builder_sources() -> list[Path]:
    """The files whose bytes the cache key covers: every module of this package, the corpus, and the
    sentence-transformers module whose file names and pooling keys the encoder builder writes."""
    return [*sorted(Path(__file__).parent.glob("*.py")), CORPUS_FILE, Path(sentence_transformers.__file__)]


def _source_fingerprint() -> str:
    h = hashlib.sha256()
    for path in builder_sources():
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(name: str, builder_kwargs: dict[str, Any] | None, builder: Callable[..., Any] | None = None) -> str:
    """``<name>-<hash>``: the hash covers the arguments, the builder, its source and library versions."""
    import tokenizers
    import transformers

    extra = {} if builder is None or builder is build_tiny_model else {"builder_fn": builder.__qualname__}
    payload = json.dumps(
        {
            "name": name,
            "kwargs": builder_kwargs or {},
            **extra,
            "builder": BUILDER_VERSION,
            "source": _source_fingerprint(),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        sort_keys=True,
        default=repr,
    )
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def default_cache_root() -> Path:
    """``$PATCHBAY_CACHE_DIR/models``, by default ``~/.cache/patchbay/models``."""
    return Path(os.environ.get("PATCHBAY_CACHE_DIR") or Path.home() / ".cache" / "patchbay") / "models"


def cached_model(
    name: str,
    builder_kwargs: dict[str, Any] | None = None,
    *,
    cache_root: str | os.PathLike | None = None,
    builder: Callable[..., Path] | None = None,
) -> Path:
    """Build ``builder(dir, **builder_kwargs)`` once into the cache and return its directory.

    ``builder`` defaults to :func:`build_tiny_model`; pass e.g.
    :func:`build_tiny_encoder` (or use :func:`cached_encoder`). The build goes
    to a temporary sibling directory that is renamed into place, so a
    directory under its final name is always complete; concurrent builders
    race harmlessly (the loser's copy is discarded).
    """
    builder = builder or build_tiny_model
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / cache_key(name, builder_kwargs, builder)
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        builder(tmp, **(builder_kwargs or {}))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_encoder(
    name: str, builder_kwargs: dict[str, Any] | None = None, *, cache_root: str | os.PathLike | None = None
) -> Path:
    """:func:`cached_model` with :func:`build_tiny_encoder` as the builder."""
    return cached_model(name, builder_kwargs, cache_root=cache_root, builder=build_tiny_encoder)


def cached_llava(builder_kwargs: dict[str, Any] | None = None, *, name: str = "tiny-llava",
                 cache_root: str | os.PathLike | None = None) -> Path:
    """:func:`cached_model` with :func:`build_tiny_llava` as the builder."""
    return cached_model(name, builder_kwargs, cache_root=cache_root, builder=build_tiny_llava)


def cached_clip(builder_kwargs: dict[str, Any] | None = None, *, name: str = "tiny-clip",
                cache_root: str | os.PathLike | None = None) -> Path:
    """:func:`cached_model` with :func:`build_tiny_clip` as the builder."""
    return cached_model(name, builder_kwargs, cache_root=cache_root, builder=build_tiny_clip)
