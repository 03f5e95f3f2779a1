"""Family-agnostic safetensors loading.

A model family says which weights its layout expects (name -> shape) and
:func:`load_checked` reads them, checked; or it iterates ``(name, tensor)``
pairs itself (:func:`iter_safetensors`). :func:`frozen` and
:func:`weights_module` hold loaded tensors as inference-only parameters.
Nothing here knows about any architecture.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the model's layout."""


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: ``model.safetensors``, or the shards its index names."""
    model_dir = Path(model_dir)
    single = model_dir / SINGLE_FILE
    index = model_dir / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {missing}")
        return files
    others = sorted(p.name for p in model_dir.glob("*.bin")) if model_dir.is_dir() else []
    hint = f" (found {others}; only safetensors checkpoints are supported)" if others else ""
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}{hint}")


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every ``(name, tensor)`` of the checkpoint in ``model_dir``, on CPU, in stored dtype.

    Handles a single ``model.safetensors`` and a sharded checkpoint described by
    ``model.safetensors.index.json``. Tensors are read one at a time, so a
    caller that converts and drops them keeps peak memory near one copy.

    Each tensor is the process's own memory, 64-byte aligned (torch's CPU allocator), not a
    view into the file's mapping: safetensors packs tensors at 8-byte offsets, and kernels
    that stream a weight with 64-byte vector loads run up to 1.5x slower on a misaligned one.
    """
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                yield name, t.clone() if t.data_ptr() % 64 else t


def check_names(model_dir: str | Path, expected: Iterable[str], found: Iterable[str], optional: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` naming the missing and unexpected weights, if any."""
    expected, found, optional = set(expected), set(found), set(optional)
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - optional)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {missing}")
        if unexpected:
            parts.append(f"unexpected weights {unexpected}")
        raise CheckpointError(f"checkpoint {model_dir} does not match the model: " + "; ".join(parts))


def load_checked(
    model_dir: str | Path,
    required: Mapping[str, tuple[int, ...]],
    optional: Mapping[str, tuple[int, ...]],
    dtype: Any,
    *,
    rename: Callable[[str], str] = lambda name: name,
    skip: Callable[[str], bool] = lambda name: False,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in ``dtype`` under the family's names, checked against its layout.

    ``rename`` maps a stored name to the family's (two stored names on one are an error);
    ``skip`` drops stored entries that never matter (buffers, pre-training heads). Every
    ``required`` name must be there, nothing else but ``optional`` ones, and each with its
    shape; :class:`CheckpointError` says what is wrong.
    """
    weights: dict[str, torch.Tensor] = {}
    for raw, tensor in iter_safetensors(model_dir):
        if skip(raw):
            continue
        name = rename(raw)
        if name in weights:
            raise CheckpointError(f"checkpoint {model_dir}: {raw!r} and another entry both map to {name!r}")
        weights[name] = tensor.to(dtype)
    check_names(model_dir, required, weights, optional)
    wrong = [
        f"{name} {tuple(weights[name].shape)} (expected {shape})"
        for name, shape in {**required, **optional}.items()
        if name in weights and tuple(weights[name].shape) != tuple(shape)
    ]
    if wrong:
        raise CheckpointError(f"checkpoint {model_dir} does not match its config.json: wrong shapes: {wrong}")
    return weights


def frozen(t: torch.Tensor | None) -> Any:
    """An inference-only ``nn.Parameter`` of ``t`` (None stays None)."""
    from torch import nn

    return None if t is None else nn.Parameter(t, requires_grad=False)


def weights_module(weights: Mapping[str, torch.Tensor | None]) -> Any:
    """An ``nn.Module`` holding ``weights`` as frozen parameters (a layer's weights; the forward lives elsewhere)."""
    from torch import nn

    module = nn.Module()
    for name, t in weights.items():
        module.register_parameter(name, frozen(t))
    return module


__all__ = ["CheckpointError", "check_names", "frozen", "iter_safetensors", "load_checked", "safetensors_files",
           "weights_module"]
