"""Load the served model: pick its family, weights, tokenizer, context length; size the KV cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from patchbay.config import ConfigError, ServerConfig
from patchbay.model import ENCODER_KINDS, LoadRequest, check_model
from patchbay.registry import ModelFamily, Registries, StartupError

if TYPE_CHECKING:
    from patchbay.plugins import PluginSet

log = logging.getLogger("patchbay.loader")

#: KV cache default on CPU when --kv-cache-memory is not given (vLLM's CPU default too)
DEFAULT_CPU_KV_BYTES = 4 * 1024**3
#: models up to this many parameters run faster with one torch thread (per-op overhead dominates)
SMALL_MODEL_PARAMS = 8_000_000


@attrs.define
class LoadedModel:
    """A loaded model and what was resolved to load it."""

    model_dir: Path
    hf_config: Any
    family: ModelFamily
    task: str
    #: the family's model, checked against the contract
    model: Any
    #: the Protocol of :mod:`patchbay.model` it fulfils for ``task``
    kind: type
    tokenizer: Any
    dtype: Any
    device: Any
    max_model_len: int
    eos_token_ids: list[int]
    generation_config: dict[str, Any]
    threads: int


def tune_malloc() -> bool:
    """Keep freed large blocks in the heap instead of returning them to the OS (glibc).

    A forward allocates the same large temporaries every step; by default glibc
    serves blocks over 128 KiB with fresh mmaps and unmaps them on free, so
    every step page-faults them in again (slow on this kind of VM). Raising
    the mmap and trim thresholds makes them reusable. Returns True if applied.
    """
    import ctypes
    import ctypes.util

    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        ok &= libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def resolve_model_dir(config: ServerConfig) -> Path:
    if config.model is None:
        raise ConfigError("model", "no model given")
    path = Path(config.model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            "model",
            f"{config.model!r} is not a local Hugging Face model directory (no config.json there); "
            "patchbay never downloads models",
        )
    return path


def with_default_model(config: ServerConfig, plugins: PluginSet) -> ServerConfig:
    """``config`` with a model: its own (or its ``models``), else the one a plugin's ``default_model``
    hook offers."""
    if config.model is not None or config.models:
        return config
    found = plugins.default_model()
    if found is None:
        raise StartupError("no model given, and no loaded plugin offers a default one (the 'demo' plugin is not "
                           "loaded); name a local Hugging Face model directory: serve MODEL_DIR")
    log.info("no model given: serving %s (%s)", found.what or found.name, found.path)
    return attrs.evolve(config, model=str(found.path), served_model_name=config.served_model_name or (found.name,))


def read_architectures(model_dir: Path) -> list[str]:
    with open(model_dir / "config.json") as f:
        return list(json.load(f).get("architectures") or [])


def choose_task(config: ServerConfig, archs: list[str], registries: Registries) -> str:
    """The task the server runs: ``--convert`` when given, else generate when a family can, else
    transcription (speech), else the first pooling task a family offers (``--runner`` narrows the choice:
    ``generate`` covers transcription, as vLLM's does)."""
    if config.convert in ("embed", "classify"):
        return config.convert
    offered = registries.tasks_for(archs, config.model_impl)
    order = {"generate": ["generate", "transcription"], "pooling": ["embed", "classify"]}.get(
        config.runner, ["generate", "transcription", "embed", "classify"])
    for task in order:
        if task in offered:
            return task
    return order[0]


def pick_family(model_dir: Path, registries: Registries, task: str | None = None,
                config: ServerConfig | None = None) -> ModelFamily:
    """The family that serves ``model_dir`` for ``task`` under ``--model-impl``; a :class:`ConfigError`
    naming the architecture and what is registered when none does."""
    config = config or ServerConfig()
    archs = read_architectures(model_dir)
    if task is None:
        task = choose_task(config, archs, registries)
    impl = config.model_impl
    if impl != "auto" and not any(f.implements(impl) for f in registries.model_families.values()) \
            and not any(f.implements(impl) for f in registries.fallback_families):
        raise ConfigError("--model-impl", f"no loaded model family implements {impl!r}; implementations: auto, "
                                          f"{', '.join(registries.impls()) or 'none'} (native is also spelt vllm)")
    family = registries.family_for(archs, task, impl)
    if family is None:
        known = sorted({arch for (arch, t), f in registries.model_families.items() if t == task and f.implements(impl)})
        fallbacks = [f"the {f.name} family (the architectures it claims for this task)" for f in registries.fallback_families
                     if task in f.tasks and f.implements(impl)]
        available = ", ".join(known + fallbacks) or "none (is a model plugin disabled by --plugins?)"
        raise ConfigError(
            "model",
            f"no loaded model family runs {archs or 'this model'} for task {task!r}"
            f"{'' if impl == 'auto' else f' with --model-impl {impl}'}; registered: {available}",
        )
    return family


def load_with_family(family: ModelFamily, request: LoadRequest, archs: list[str], config: ServerConfig,
                     registries: Registries) -> tuple[ModelFamily, Any]:
    """``(family, model)``: ``family.load(request)``; under ``--model-impl auto``, when a family that lists the
    architecture refuses this checkpoint (an option it does not support), the fallback family that runs it."""
    try:
        return family, family.load(request)
    except ValueError as exc:
        other = None
        if config.model_impl == "auto" and family.runs is None:
            other = registries.fallback_for(archs, request.task, besides=family)
        if other is None:
            raise
        log.warning("the %s family cannot load %s (%s); loading it with the %s family instead",
                    family.name, request.model_dir, exc, other.name)
        return other, other.load(request)


def resolve_dtype(flag: str, hf_config: Any, device: Any) -> Any:
    import torch

    names = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "half": torch.float16}
    if flag != "auto":
        return names[flag]
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = names.get(declared, torch.float32)
    if declared is None:
        return torch.float32
    if declared == torch.float16 and device.type == "cpu":
        return torch.bfloat16  # float16 matmuls are slow on CPU
    return declared


def resolve_device(flag: str) -> Any:
    import torch

    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(flag)


def _generation_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    if path.is_file():
        with open(path) as f:
            return json.load(f)
    return {}


def _eos_ids(tokenizer: Any, gen: dict[str, Any], hf_config: Any) -> list[int]:
    ids: list[int] = []
    for source in (gen.get("eos_token_id"), getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i not in ids:
                ids.append(int(i))
    return ids


def load_model(config: ServerConfig, registries: Registries) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve_model_dir(config)
    archs = read_architectures(model_dir)
    task = choose_task(config, archs, registries)
    family = pick_family(model_dir, registries, task, config)
    tune_malloc()
    hf_config = AutoConfig.from_pretrained(model_dir)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    threads = config.cpu_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    request = LoadRequest(model_dir=model_dir, hf_config=hf_config, task=task, dtype=dtype, device=device)
    family, model = load_with_family(family, request, archs, config, registries)
    kind = check_model(family.name, task, model)
    params = int(model.num_parameters)
    if config.cpu_threads is None and device.type == "cpu" and params and params <= SMALL_MODEL_PARAMS:
        threads = 1
        torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
    limit = int(model.max_position_embeddings)
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ConfigError(
            "--max-model-len",
            f"{config.max_model_len} is more than the model's max_position_embeddings ({limit})",
        )
    max_model_len = config.max_model_len or limit
    gen = _generation_config(model_dir)
    log.info(
        "loaded %s (%s, family %s [%s implementation, --model-impl %s], task %s): %.1fM parameters, %s on %s, "
        "context %d, %d torch threads",
        model_dir, ",".join(archs), family.name, family.impl, config.model_impl, task, params / 1e6,
        str(dtype).removeprefix("torch."), device, max_model_len, threads,
    )
    return LoadedModel(
        model_dir=model_dir, hf_config=hf_config, family=family, task=task, model=model, kind=kind,
        tokenizer=tokenizer, dtype=dtype, device=device, max_model_len=max_model_len,
        eos_token_ids=_eos_ids(tokenizer, gen, hf_config), generation_config=gen, threads=threads,
    )


def kv_cache_blocks(config: ServerConfig, loaded: LoadedModel, budget: int | None = None) -> int:
    """How many blocks the KV cache gets out of ``budget`` bytes (default: this model's alone, see
    :mod:`patchbay.budget`); at least one full-length sequence must fit."""
    if loaded.kind in ENCODER_KINDS:
        return 1  # encoders keep no KV cache; the pool is a placeholder

    from patchbay.budget import kv_budgets
    from patchbay.engine.runner import kv_block_bytes

    if budget is None:
        budget = kv_budgets([(config, loaded)])[0].nbytes  # type: ignore[union-attr]
    per_block = kv_block_bytes(loaded.model.kv_layout, config.block_size, loaded.dtype)
    per_seq = -(-loaded.max_model_len // config.block_size)
    blocks = budget // per_block
    if blocks < per_seq:
        raise ConfigError(
            "--kv-cache-memory",
            f"{budget} bytes hold {blocks * config.block_size} tokens, fewer than one sequence of "
            f"--max-model-len {loaded.max_model_len}; raise --kv-cache-memory or lower --max-model-len",
        )
    return blocks
