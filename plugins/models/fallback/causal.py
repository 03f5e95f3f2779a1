"""A transformers ``...ForCausalLM`` served as a :class:`patchbay.model.GenerativeModel` over the paged cache.

The model is transformers' own (its modelling code, its weights loading), loaded
with ``attn_implementation`` set to patchbay's paged attention function
(:mod:`.attention`). One engine step is one forward of the base model over the
step's flat token batch as a batch of one sequence ``[1, T]`` with the tokens'
own positions; every per-token part of the model (embeddings, norms, MLPs,
mixture-of-experts routing, rotary embeddings by ``position_ids``) does not care
that the "sequence" is really several, and attention is done by the paged
kernel, which knows where each sequence's context lies.

At load, one discovery forward records every attention layer (its KV heads,
head width, window and cap, and any option the function cannot honour, which
stops start-up naming it); then :func:`.probe.self_check` compares the paged
path with transformers' own eager attention on two short sequences.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from patchbay.model import KVLayout, LoadRequest
from patchbay_plugins.models.fallback import support
from patchbay_plugins.models.fallback.attention import (
    ATTN_IMPLEMENTATION,
    Discovery,
    SeenLayer,
    Step,
    UnsupportedAttention,
    current,
    paged_attention_forward,
)

log = logging.getLogger("patchbay.models.transformers")
#: swap faster layers in (:mod:`.swaps`); ``PATCHBAY_FALLBACK_NO_SWAPS=1`` keeps transformers' own
SWAP_LAYERS = os.environ.get("PATCHBAY_FALLBACK_NO_SWAPS", "") in ("", "0")
#: config values that turn the LM head's output into the model's logits (name -> how), applied in this order
LOGIT_OPTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "logit_scale": lambda x, s: x.mul_(s),  # Cohere
    "logits_scaling": lambda x, s: x.div_(s),  # Granite
    "final_logit_softcapping": lambda x, c: x.div_(c).tanh_().mul_(c),  # Gemma 2 / 3
}
#: config values of attention that reach the attention function only through a mask transformers no longer builds
UNHONOURED_CONFIG = ("attention_chunk_size",)
#: layer types whose layers are attention over the KV cache (any other mixes tokens along the flat batch)
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def register_attention() -> None:
    """Make :data:`ATTN_IMPLEMENTATION` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


class TransformersCausalModel:
    """A :class:`patchbay.model.GenerativeModel` (a :class:`~patchbay.model.CausalPoolingModel` once
    ``pooling`` is set) over a transformers causal LM; see the module docstring."""

    def __init__(self, hf_model: Any, architecture: str):
        self.hf_model = hf_model
        self.architecture = architecture
        self.base = hf_model.base_model
        self.lm_head = hf_model.get_output_embeddings()
        if self.lm_head is None:
            raise UnsupportedAttention(f"transformers' {type(hf_model).__name__} has no output embeddings (LM head)")
        config = hf_model.config.get_text_config()
        self.config = config
        weight = self.lm_head.weight
        self.dtype: torch.dtype = weight.dtype
        self.device: torch.device = weight.device
        self.vocab_size: int = int(weight.shape[0])
        max_pos = getattr(config, "max_position_embeddings", None)
        if not max_pos:
            raise UnsupportedAttention(f"{architecture}: its config names no max_position_embeddings")
        self.max_position_embeddings: int = int(max_pos)
        #: every layer's window is applied per layer, as transformers hands it over
        self.sliding_window: int | None = None
        self.num_parameters: int = sum(p.numel() for p in hf_model.parameters())
        #: pooling facts when served as an embedder (set by ``load``), else None
        self.pooling = None
        #: (config option, value) applied to the LM head's output (unset and zero ones left out)
        self.logit_options = [(name, float(getattr(config, name))) for name in LOGIT_OPTIONS
                              if getattr(config, name, None)]
        self.layers = self._discover()
        first = self.layers[0]
        self.kv_layout = KVLayout(len(self.layers), first.num_kv_heads, first.head_dim)
        self.layer_of = {seen.layer_idx: i for i, seen in enumerate(self.layers)}
        #: layers replaced by patchbay kernels (:mod:`.swaps`), by kind
        self.swapped: dict[str, int] = {}

    # ------------------------------------------------------------------ loading

    def _check_config(self) -> None:
        for name in UNHONOURED_CONFIG:
            if getattr(self.config, name, None):
                raise UnsupportedAttention(f"{self.architecture}: the config option {name}="
                                           f"{getattr(self.config, name)!r} cannot be honoured by paged attention")
        types = getattr(self.config, "layer_types", None) or ()
        other = sorted({t for t in types if t not in ATTENTION_LAYER_TYPES})
        if other:
            raise UnsupportedAttention(f"{self.architecture}: layer_types {other} are not attention over a KV cache "
                                       f"(only {', '.join(ATTENTION_LAYER_TYPES)} are served)")

    def _discover(self) -> list[SeenLayer]:
        """Every attention layer, from one forward whose attention calls record themselves."""
        self._check_config()
        found = Discovery()
        ids = torch.arange(5, 9, device=self.device).unsqueeze(0) % max(self.vocab_size, 1)  # past most specials
        with torch.inference_mode(), current(found) as step_kwargs:
            self.base(input_ids=ids, position_ids=torch.arange(4, device=self.device).unsqueeze(0), use_cache=False,
                      **step_kwargs)
        layers = found.layers
        expected = getattr(self.config, "num_hidden_layers", None)
        if not layers or (isinstance(expected, int) and len(layers) < expected):
            raise UnsupportedAttention(
                f"transformers' {type(self.hf_model).__name__}: {len(layers)} of its {expected} layers route their "
                "attention through transformers' AttentionInterface, so patchbay's paged attention cannot serve it")
        idx = [seen.layer_idx for seen in layers]
        if len(set(idx)) != len(idx):
            raise UnsupportedAttention(f"{self.architecture}: layers share KV caches (layer_idx {idx}); "
                                       "cross-layer KV sharing is not supported")
        shapes = {(seen.num_kv_heads, seen.head_dim) for seen in layers}
        if len(shapes) != 1:
            raise UnsupportedAttention(f"{self.architecture}: layers differ in (KV heads, head width): "
                                       f"{sorted(shapes)}; one paged cache layout serves all layers")
        return layers

    # ------------------------------------------------------------------ the contract

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: Any) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` of the flat batch (transformers' base model, paged attention)."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} (k_cache, v_cache) pairs, got {len(kv_caches)}")
        with current(Step(kv_caches, meta, self.layer_of, self.max_position_embeddings)) as step_kwargs:
            out = self.base(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                            **step_kwargs)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, vocab]``: the LM head, then the config's logit options (scale, soft-cap)."""
        logits = self.lm_head(hidden).float()
        for name, value in self.logit_options:
            logits = LOGIT_OPTIONS[name](logits, value)
        return logits

    def pool_last(self, hidden: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[N, hidden]`` float32 from last-token states (normalised per ``self.pooling``)."""
        out = hidden.float()
        if self.pooling is not None and self.pooling.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out

    def __repr__(self) -> str:
        windows = sorted({seen.sliding_window for seen in self.layers if seen.sliding_window})
        return (f"TransformersCausalModel({self.architecture}, layers={len(self.layers)}, "
                f"kv_heads={self.kv_layout.num_kv_heads}, head_dim={self.kv_layout.head_dim}, windows={windows}, "
                f"logit_options={self.logit_options}, dtype={self.dtype})")


def load_causal(request: LoadRequest) -> TransformersCausalModel:
    """transformers' causal LM of ``request.model_dir`` over the paged cache, checked (:func:`.probe.self_check`)."""
    from patchbay_plugins.models.fallback import probe, swaps

    register_attention()
    arch, cls = support.model_class(list(getattr(request.hf_config, "architectures", None) or []), "generate")
    hf_model = support.from_folder(cls, Path(request.model_dir), request.dtype, request.device,
                                   attn_implementation=ATTN_IMPLEMENTATION)
    model = TransformersCausalModel(hf_model, arch)
    before = probe.reference(model)
    if SWAP_LAYERS:
        model.swapped = swaps.swap_layers(hf_model)
        model.lm_head = hf_model.get_output_embeddings()  # swapped too
    worst = probe.self_check(model, before)
    log.info("transformers fallback: %r; patchbay kernels swapped in: %s; start-up self-check: paged logits "
             "within %.1e of transformers' eager ones", model, swaps.describe(model.swapped), worst)
    return model


__all__ = ["LOGIT_OPTIONS", "TransformersCausalModel", "load_causal", "register_attention"]
