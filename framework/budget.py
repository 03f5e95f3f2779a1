"""Memory across the served models: each model's KV cache budget, and the start-up report.

A model with ``--kv-cache-memory`` gets exactly that. The others share what
is left of the default total of their device (4 GiB on CPU, 80% of the free
memory on CUDA, measured after every model's weights are loaded): each gets
what ``max-num-seqs × max-model-len`` needs when that fits its share, and the
ones that need more split the rest evenly. With one model this is the
single-model default: what it needs, capped at the total.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Sequence

import attrs

from patchbay.config import ConfigError, ServerConfig
from patchbay.loader import DEFAULT_CPU_KV_BYTES, LoadedModel
from patchbay.model import ENCODER_KINDS

log = logging.getLogger("patchbay.budget")


@attrs.frozen
class KVBudget:
    """Bytes for one model's KV cache and where the number came from."""

    nbytes: int
    how: str


def _fmt(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def device_total(device) -> tuple[int, str]:
    """The KV cache total of a device when no model says its size, and how it was found."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8), f"80% of the {_fmt(free)} free on {device}"
    return DEFAULT_CPU_KV_BYTES, f"the {_fmt(DEFAULT_CPU_KV_BYTES)} CPU default"


def kv_need(config: ServerConfig, loaded: LoadedModel) -> int:
    """Bytes ``max-num-seqs`` sequences of ``max-model-len`` tokens take."""
    from patchbay.engine.runner import kv_block_bytes

    per_block = kv_block_bytes(loaded.model.kv_layout, config.block_size, loaded.dtype)
    return per_block * -(-loaded.max_model_len // config.block_size) * config.max_num_seqs


def kv_budgets(models: Sequence[tuple[ServerConfig, LoadedModel]]) -> list[KVBudget | None]:
    """Each model's KV cache budget (None for an encoder, which keeps no KV cache)."""
    out: list[KVBudget | None] = [None] * len(models)
    by_device: dict[str, list[int]] = defaultdict(list)
    for i, (config, loaded) in enumerate(models):
        if loaded.kind in ENCODER_KINDS:
            continue
        if config.kv_cache_memory is not None:
            out[i] = KVBudget(config.kv_cache_memory, "kv-cache-memory")
        by_device[str(loaded.device)].append(i)
    for device, members in by_device.items():
        total, source = device_total(models[members[0]][1].device)
        given = sum(out[i].nbytes for i in members if out[i] is not None)  # type: ignore[union-attr]
        if device.startswith("cuda") and given > total:
            raise ConfigError("--kv-cache-memory", f"the models on {device} ask for {_fmt(given)} of KV cache, "
                              f"more than {source} ({_fmt(total)})")
        rest = sorted((i for i in members if out[i] is None), key=lambda i: kv_need(*models[i]))
        left = max(total - given, 0)
        for n, i in enumerate(rest):
            need = kv_need(*models[i])
            share = left // (len(rest) - n)
            if need <= share:
                out[i] = KVBudget(need, "what max-num-seqs x max-model-len needs")
            else:
                others = " (after the models that set kv-cache-memory)" if given else ""
                split = f"a 1/{len(rest) - n} share of" if len(rest) - n > 1 else "what is left of" if n else "all of"
                out[i] = KVBudget(share, f"{split} {source}{others}")
            left -= out[i].nbytes  # type: ignore[union-attr]
    return out


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def report(rows: Sequence[tuple[str, LoadedModel, KVBudget | None, int]], block_size_of: Sequence[int]) -> None:
    """Log each model's weights and KV cache, and the totals (``rows``: name, loaded, budget, blocks)."""
    weights_total = kv_total = 0
    for (name, loaded, budget, blocks), block_size in zip(rows, block_size_of):
        weights = int(loaded.model.num_parameters) * loaded.dtype.itemsize
        weights_total += weights
        if budget is None:
            kv = "no KV cache (an encoder)"
        else:
            kv_total += budget.nbytes
            kv = (f"KV cache {_fmt(budget.nbytes)} = {blocks} blocks of {block_size} tokens "
                  f"({blocks * block_size} tokens; {budget.how})")
        log.info("memory of %r on %s: weights %s (%s), %s", name, loaded.device, _fmt(weights),
                 str(loaded.dtype).removeprefix("torch."), kv)
    if len(rows) > 1:
        log.info("memory of %d models: weights %s, KV caches %s", len(rows), _fmt(weights_total), _fmt(kv_total))
    available = _available_memory() if os.name == "posix" else None
    if available is not None and kv_total > available:  # (CPU caches are touched as they fill)
        log.warning("the KV caches (%s) are larger than the memory available now (%s): they fill as requests "
                    "come, and may run out", _fmt(kv_total), _fmt(available))
