"""What every tiny builder shares: the output folder, the config's sizes, random weights, safetensors files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchbay.weights import INDEX_FILE, SINGLE_FILE

if TYPE_CHECKING:
    import torch

#: Parameters :func:`write_config_and_weights` scales by ``qk_gain``: query / key projections, alone or fused
#: with the value projection (Llama-style, GPT-NeoX, Phi-3, GPT-2, BERT).
QK_WEIGHTS = re.compile(r"(?:q_proj|k_proj|qkv_proj|query_key_value|c_attn|Wqkv|query|key)\.weight$")

#: A builder's size argument -> the transformers config key it sets, where the two names differ.
_CONFIG_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


def prepare_folder(directory: str | os.PathLike, dtype: Any) -> tuple[Path, torch.dtype]:
    """Check ``dtype`` (a torch dtype or its name), create ``directory`` and remove the weights of a previous
    build into it; return both."""
    import torch

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a previous build into the same directory
    return directory, torch_dtype


def size_config(**sizes: Any) -> dict[str, Any]:
    """Config kwargs of a builder's sizes (``num_layers`` -> ``num_hidden_layers``, ...), with
    ``initializer_range = hidden_size ** -0.5`` so that attention and logits are far from uniform."""
    kwargs = {_CONFIG_KEYS.get(name, name): value for name, value in sizes.items()}
    kwargs["initializer_range"] = round(sizes["hidden_size"] ** -0.5, 6)
    return kwargs


def write_config_and_weights(
    directory: Path, arch: str, config_class: str, kwargs: dict[str, Any], *, dtype: torch.dtype, seed: int, shards: int,
    qk_gain: float = 1.0,
) -> Any:
    """Save ``transformers.<config_class>(**kwargs)`` as ``arch`` and random weights of ``arch`` in ``dtype``
    (the :data:`QK_WEIGHTS` times ``qk_gain``); return the config."""
    import transformers

    config = getattr(transformers, config_class)(**kwargs)
    config.architectures = [arch]
    config.dtype = dtype
    state = _random_state_dict(config, arch, seed, dtype, qk_gain)
    config.save_pretrained(str(directory))
    _save_weights(directory, state, shards)
    return config


def _random_state_dict(config, arch: str, seed: int, dtype, qk_gain: float = 1.0) -> dict:
    import torch
    import transformers

    model_cls = getattr(transformers, arch)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_cls(config)
    # transformers initialises norms (RMSNorm, LayerNorm) to 1 and biases to 0; make them random so
    # that tests exercise them (Qwen2 qkv bias, Qwen3 q_norm/k_norm, BERT's LayerNorms).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.lower().endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            if qk_gain != 1.0 and QK_WEIGHTS.search(name):
                p.mul_(qk_gain)
    state = {}
    for name, t in model.state_dict().items():
        if getattr(config, "tie_word_embeddings", False) and name == "lm_head.weight":
            continue
        state[name] = t.detach().to(dtype).contiguous().clone()
    return state


def _save_weights(directory: Path, state: dict, shards: int) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if shards <= 1:
        save_file(state, str(directory / SINGLE_FILE), metadata=meta)
        return
    names = list(state)
    if shards > len(names):
        raise ValueError(f"shards={shards} exceeds the number of tensors ({len(names)})")
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc, prev, n = 0, 0, len(names)
    for i, (name, size) in enumerate(zip(names, sizes)):
        # by cumulative size, never backwards, never skipping a shard, and
        # leaving at least one tensor for every remaining shard
        shard = min(acc * shards // total, shards - 1, prev + 1)
        shard = max(shard, prev, shards - (n - i))
        groups[shard].append(name)
        acc, prev = acc + size, shard
    weight_map = {}
    for j, group in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in group}, str(directory / fname), metadata=meta)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
