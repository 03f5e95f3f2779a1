"""The attention function transformers' modelling code calls, over patchbay's paged KV cache.

Registered once in transformers' ``AttentionInterface`` under :data:`ATTN_IMPLEMENTATION`;
a model loaded with ``attn_implementation=ATTN_IMPLEMENTATION`` calls
:func:`paged_attention_forward` from every attention layer with that layer's
rotated query / key / value ``[1, heads, T, head_dim]`` and the keyword arguments
the layer adds: ``scaling``, ``sliding_window``, ``softcap`` (and ``dropout``).
What the engine hands the model per step reaches the function through the
forward's keyword arguments: the family's forward passes one :class:`Step`
(every layer's ``(k_cache, v_cache)`` and the step's
:class:`~patchbay_kernels.attention.AttentionMetadata`) as ``patchbay_step``,
and transformers passes the forward's ``**kwargs`` down to every attention call.
A few models' layers drop those keyword arguments on the way (StableLM's
decoder layer calls its attention without them); for them the step is also
held in a context variable for the duration of the forward (:func:`current`).

transformers builds no mask for an implementation it does not know
(``attention_mask`` is None): causality, each layer's window and the cap are
applied here, by :func:`patchbay_kernels.attention.paged_attention`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Sequence

import torch

from patchbay_kernels.attention import AttentionMetadata, paged_attention

#: the name the function is registered under in transformers' AttentionInterface
ATTN_IMPLEMENTATION = "patchbay_paged"
#: the keyword argument that carries the :class:`Step` from the forward to the attention function
STEP_KWARG = "patchbay_step"
#: keyword arguments transformers passes that need nothing from us (zero dropout in eval; positions are in q/k)
_NOTHING_TO_DO = frozenset({"position_ids", "is_causal", "cache_position", "output_attentions", "use_cache"})
#: attention options honoured here
HONOURED = frozenset({"scaling", "sliding_window", "softcap"})


class UnsupportedAttention(ValueError):
    """A layer asked for something this attention function does not do (named in the message)."""


@dataclasses.dataclass(frozen=True)
class SeenLayer:
    """One attention layer as :class:`Discovery` saw it."""

    layer_idx: int
    module: str
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    softcap: float | None


class Discovery:
    """Passed instead of a :class:`Step`: each attention call records its layer (and attends with plain SDPA)."""

    def __init__(self) -> None:
        self.layers: list[SeenLayer] = []


class Step:
    """What one forward's attention calls share: the caches, the step's metadata, a window's metadata copies."""

    __slots__ = ("kv_caches", "meta", "layer_of", "max_window", "_by_window")

    def __init__(self, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                 layer_of: dict[int, int], max_window: int):
        self.kv_caches = kv_caches
        self.meta = meta
        #: transformers' ``layer_idx`` -> the index of that layer's cache
        self.layer_of = layer_of
        #: windows at least this long are no window (no sequence is longer)
        self.max_window = max_window
        self._by_window: dict[int | None, AttentionMetadata] = {meta.sliding_window: meta}

    def meta_for(self, window: int | None) -> AttentionMetadata:
        """The step's metadata with ``window`` (one copy per window, shared by its layers so that what
        the kernels derive at the first layer is reused)."""
        if window is not None and window >= self.max_window:
            window = None
        found = self._by_window.get(window)
        if found is None:
            found = self._by_window[window] = dataclasses.replace(self.meta, sliding_window=window)
        return found


_CURRENT: contextvars.ContextVar[Step | Discovery | None] = contextvars.ContextVar("patchbay_step", default=None)


@contextlib.contextmanager
def current(step: Step | Discovery) -> Iterator[dict[str, Any]]:
    """The forward's keyword arguments carrying ``step``; ``step`` is also the current one while inside."""
    token = _CURRENT.set(step)
    try:
        yield {STEP_KWARG: step}
    finally:
        _CURRENT.reset(token)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``[1, T, heads, head_dim]`` attention output, no weights."""
    step: Step | Discovery | None = kwargs.pop(STEP_KWARG, None) or _CURRENT.get()
    if step is None:
        raise UnsupportedAttention(
            f"{type(module).__name__} called patchbay's paged attention outside a patchbay forward "
            f"(no {STEP_KWARG!r} keyword argument reached it)")
    if query.shape[0] != 1:
        raise UnsupportedAttention(f"expected one flat batch of tokens, got a batch of {query.shape[0]}")
    if type(step) is Discovery:
        return _discover(step, module, query, key, value, attention_mask, scaling, sliding_window, softcap, kwargs)
    layer = step.layer_of[module.layer_idx]
    k_cache, v_cache = step.kv_caches[layer]
    q = query[0].transpose(0, 1)  # [T, Hq, D], views
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    out = paged_attention(q, k, v, k_cache, v_cache, step.meta_for(sliding_window), scale,
                          softcap=float(softcap) if softcap else None)
    return out.unsqueeze(0), None


def _discover(found: Discovery, module, query, key, value, attention_mask, scaling, sliding_window, softcap, kwargs):
    check_options(module, attention_mask, kwargs)
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        raise UnsupportedAttention(f"{type(module).__name__} has no layer_idx (which layer's KV cache is it?)")
    found.layers.append(SeenLayer(layer_idx, type(module).__name__, key.shape[1], key.shape[3],
                                  int(sliding_window) if sliding_window else None,
                                  float(softcap) if softcap else None))
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2), None


def check_options(module: torch.nn.Module, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
    """Refuse, naming it, any attention option this function would otherwise ignore."""
    if attention_mask is not None:
        raise UnsupportedAttention(f"{type(module).__name__} passes its own attention mask (patchbay builds the "
                                   "causal and sliding-window masks from the paged layout and cannot apply another)")
    if getattr(module, "is_causal", True) is False:
        raise UnsupportedAttention(f"{type(module).__name__} is not causal (is_causal=False: bidirectional "
                                   "attention, e.g. use_bidirectional_attention)")
    for name, value in kwargs.items():
        if name in _NOTHING_TO_DO or value is None:
            continue
        if name == "dropout" and not value:
            continue
        raise UnsupportedAttention(f"{type(module).__name__} passes the attention option {name!r}, which "
                                   "patchbay's paged attention does not honour")
