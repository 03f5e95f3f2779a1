"""The "llama" model family: llama-style decoders over the paged KV cache.

Covers ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``
(qkv bias) and ``Qwen3ForCausalLM`` (per-head q/k RMSNorm). Weights come
straight from the checkpoint's safetensors (:mod:`patchbay.weights`), with
q/k/v fused into one ``qkv_proj`` and gate/up into one ``gate_up_proj``.

The forward is the server's hot path: it runs the layers as a flat loop of
functional calls on plain tensors (no submodule ``__call__``, no hooks) and
uses the :mod:`patchbay_kernels` ops. Rotary tables come from transformers'
own rope initialisation, so every static rope type matches transformers.

Module import is light (no torch); torch is imported when a model is loaded.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from patchbay import hookimpl
from patchbay.model import LoadRequest
from patchbay.registry import ModelFamily

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: rope types whose tables do not depend on the sequence length within max_position_embeddings
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


@hookimpl
def register_model_families(register):
    register(
        ModelFamily(
            name="llama",
            architectures=ARCHITECTURES,
            tasks=frozenset({"generate", "embed"}),
            load=load,
        )
    )


def load(request: LoadRequest):
    """Build the model of ``request.model_dir`` in ``request.dtype`` on ``request.device``.

    Returns a :class:`patchbay.model.GenerativeModel` (see ``LlamaFamilyModel``, built
    lazily). For task ``embed`` (``--convert embed``) it is a
    :class:`patchbay.model.CausalPoolingModel`: the last token's state,
    L2-normalised unless a sentence-transformers folder says otherwise (only
    last-token pooling: a decoder's last state sees the whole prompt).
    """
    model = _model_class().from_checkpoint(Path(request.model_dir), request.hf_config, request.dtype, request.device)
    if request.task == "embed":
        from patchbay_plugins.models.sentence_transformers import decoder_pooling_facts

        model.pooling = decoder_pooling_facts(request.model_dir, request.hf_config, model.hidden_size)
    return model


# --------------------------------------------------------------------------- config helpers (torch-free)


@functools.lru_cache(maxsize=None)
def _model_class():
    """The model class; defined on first use so that importing the plugin does not import torch."""
    return _define_model_class()


def _layout(cfg: Any) -> dict[str, Any]:
    """Everything the weights and the forward need to know about ``cfg``."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"llama family: unsupported model_type {model_type!r} (supported: {_MODEL_TYPES})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"llama family: unsupported hidden_act {cfg.hidden_act!r} (only 'silu')")
    hidden = cfg.hidden_size
    num_heads = cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // num_heads
    num_layers = cfg.num_hidden_layers
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    if model_type == "qwen2":  # qkv bias always, no o_proj bias
        qkv_bias, o_bias = True, False
    elif model_type == "mistral":
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = attention_bias
    max_pos = int(cfg.max_position_embeddings)

    # sliding windows, per layer
    window = getattr(cfg, "sliding_window", None)
    if model_type in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
        window = None
    layer_types = getattr(cfg, "layer_types", None)
    if window is None:
        windows = [None] * num_layers
    elif layer_types is not None and model_type != "mistral":
        windows = [window if t == "sliding_attention" else None for t in layer_types]
    else:
        windows = [window] * num_layers
    # a window at least as long as any sequence is no window
    windows = [None if w is None or w >= max_pos else int(w) for w in windows]
    uniform = len(set(windows)) == 1
    return dict(
        model_type=model_type,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        num_layers=num_layers,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=max_pos,
        rms_norm_eps=float(cfg.rms_norm_eps),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        # the engine applies a uniform window through meta.sliding_window;
        # mixed full/sliding layers are windowed by the model itself
        sliding_window=windows[0] if uniform else None,
        layer_windows=None if uniform else windows,
    )


def expected_weights(layout: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(required, optional)``: checkpoint name -> shape, for a layout."""
    h, i, v = layout["hidden_size"], layout["intermediate_size"], layout["vocab_size"]
    d = layout["head_dim"]
    q, kv = layout["num_heads"] * d, layout["num_kv_heads"] * d
    req: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    opt: dict[str, tuple[int, ...]] = {}
    (opt if layout["tie_word_embeddings"] else req)["lm_head.weight"] = (v, h)
    for n in range(layout["num_layers"]):
        p = f"model.layers.{n}."
        req[p + "input_layernorm.weight"] = (h,)
        req[p + "post_attention_layernorm.weight"] = (h,)
        for proj, rows, cols, bias in (
            ("q_proj", q, h, layout["qkv_bias"]),
            ("k_proj", kv, h, layout["qkv_bias"]),
            ("v_proj", kv, h, layout["qkv_bias"]),
            ("o_proj", h, q, layout["o_bias"]),
        ):
            req[p + f"self_attn.{proj}.weight"] = (rows, cols)
            if bias:
                req[p + f"self_attn.{proj}.bias"] = (rows,)
        if layout["qk_norm"]:
            req[p + "self_attn.q_norm.weight"] = (d,)
            req[p + "self_attn.k_norm.weight"] = (d,)
        for proj, rows, cols in (("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)):
            req[p + f"mlp.{proj}.weight"] = (rows, cols)
            if layout["mlp_bias"]:
                req[p + f"mlp.{proj}.bias"] = (rows,)
    return req, opt


def rope_inv_freq(cfg: Any, head_dim: int):
    """``(inv_freq, attention_scaling)`` exactly as transformers computes them for ``cfg``."""
    import torch

    params = getattr(cfg, "rope_parameters", None)
    if params is None:  # transformers 4.x configs: rope_theta + rope_scaling
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(f"llama family: unsupported rope_type {rope_type!r} (supported: {_STATIC_ROPE_TYPES})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("llama family: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        # transformers 5 has no "default" in ROPE_INIT_FUNCTIONS: each model class
        # computes it in compute_default_rope_parameters with exactly this formula.
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    if inv_freq.numel() * 2 != head_dim:
        raise ValueError(f"llama family: rotary dim {inv_freq.numel() * 2} != head_dim {head_dim}")
    return inv_freq.to(torch.float32), float(scaling)


# --------------------------------------------------------------------------- the model


def _define_model_class():
    import dataclasses

    import torch
    import torch.nn.functional as F
    from torch import nn

    from patchbay.model import KVLayout
    from patchbay.weights import frozen, load_checked, weights_module
    from patchbay_kernels import activation, attention, norm, rotary
    from patchbay_kernels.linear import PackedLinear
    from patchbay_plugins.models.flat import FlatModel

    rms_norm = norm.rms_norm
    add_rms_norm = norm.add_rms_norm
    rope_qkv = rotary.rope_qkv
    silu_and_mul = activation.silu_and_mul
    paged_attention = attention.paged_attention

    embedding = F.embedding

    class LlamaFamilyModel(FlatModel):
        """A llama-style decoder over the paged KV cache (see the module docstring)."""

        def __init__(self, layout: dict[str, Any], weights: dict[str, torch.Tensor], inv_freq, scaling, dtype, device):
            super().__init__()
            self.layout = layout
            self.model_type: str = layout["model_type"]
            self.num_layers: int = layout["num_layers"]
            self.num_heads: int = layout["num_heads"]
            self.num_kv_heads: int = layout["num_kv_heads"]
            self.head_dim: int = layout["head_dim"]
            self.hidden_size: int = layout["hidden_size"]
            self.vocab_size: int = layout["vocab_size"]
            self.max_position_embeddings: int = layout["max_position_embeddings"]
            self.sliding_window: int | None = layout["sliding_window"]
            self.layer_windows: list[int | None] | None = layout["layer_windows"]
            self.rms_norm_eps: float = layout["rms_norm_eps"]
            self.scale: float = self.head_dim**-0.5
            self.kv_layout = KVLayout(self.num_layers, self.num_kv_heads, self.head_dim)
            #: pooling facts when served as an embedder (set by ``load``), else None
            self.pooling = None
            self.dtype = dtype
            self.device = device

            self.embed_tokens = frozen(weights.pop("model.embed_tokens.weight"))
            self.norm = frozen(weights.pop("model.norm.weight"))
            if layout["tie_word_embeddings"]:
                weights.pop("lm_head.weight", None)
                self.lm_head = self.embed_tokens
            else:
                self.lm_head = frozen(weights.pop("lm_head.weight"))
            layers = []
            for i in range(self.num_layers):
                p = f"model.layers.{i}."

                def take(name: str) -> torch.Tensor | None:
                    return weights.pop(p + name, None)

                qkv_w = torch.cat([take(f"self_attn.{x}_proj.weight") for x in "qkv"])
                qkv_b = None
                if layout["qkv_bias"]:
                    qkv_b = torch.cat([take(f"self_attn.{x}_proj.bias") for x in "qkv"])
                gate_up_w = torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")])
                gate_up_b = None
                if layout["mlp_bias"]:
                    gate_up_b = torch.cat([take("mlp.gate_proj.bias"), take("mlp.up_proj.bias")])
                layers.append(
                    weights_module(
                        dict(
                            input_layernorm=take("input_layernorm.weight"),
                            qkv_proj_weight=qkv_w,
                            qkv_proj_bias=qkv_b,
                            q_norm=take("self_attn.q_norm.weight"),
                            k_norm=take("self_attn.k_norm.weight"),
                            o_proj_weight=take("self_attn.o_proj.weight"),
                            o_proj_bias=take("self_attn.o_proj.bias"),
                            post_attention_layernorm=take("post_attention_layernorm.weight"),
                            gate_up_proj_weight=gate_up_w,
                            gate_up_proj_bias=gate_up_b,
                            down_proj_weight=take("mlp.down_proj.weight"),
                            down_proj_bias=take("mlp.down_proj.bias"),
                        )
                    )
                )
            self.layers = nn.ModuleList(layers)
            cos, sin = rotary.cos_sin_cache(inv_freq, self.max_position_embeddings, scaling)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
            self.to(device)

        # ------------------------------------------------------------------ loading

        @classmethod
        def from_checkpoint(cls, model_dir: Path, hf_config: Any, dtype, device) -> "LlamaFamilyModel":
            layout = _layout(hf_config)
            required, optional = expected_weights(layout)
            weights = load_checked(model_dir, required, optional, dtype,
                                   skip=lambda name: name.endswith("rotary_emb.inv_freq"))
            inv_freq, scaling = rope_inv_freq(hf_config, layout["head_dim"])
            with torch.no_grad():
                return cls(layout, weights, inv_freq, scaling, dtype, device)

        def _anchor(self) -> torch.Tensor:
            return self.embed_tokens

        def _build_plan(self) -> None:
            """Flat per-layer tuples of tensors for the forward loop (rebuilt after ``.to()``)."""
            if self.layout["tie_word_embeddings"]:
                self.lm_head = self.embed_tokens
            norms_in = [layer.input_layernorm for layer in self.layers] + [self.norm]
            # plain tuple: not registered as parameters/buffers
            self._fast = (self.layers[0].input_layernorm if len(self.layers) else None, self.cos, self.sin)
            self._plan = [
                (
                    PackedLinear(layer.qkv_proj_weight, layer.qkv_proj_bias),
                    layer.q_norm,
                    layer.k_norm,
                    PackedLinear(layer.o_proj_weight, layer.o_proj_bias),
                    layer.post_attention_layernorm,
                    PackedLinear(layer.gate_up_proj_weight, layer.gate_up_proj_bias),
                    PackedLinear(layer.down_proj_weight, layer.down_proj_bias),
                    norms_in[i + 1],
                )
                for i, layer in enumerate(self.layers)
            ]
            self._lm_head = PackedLinear(self.lm_head)

        # ------------------------------------------------------------------ hot path

        def forward(
            self,
            input_ids: torch.Tensor,
            positions: torch.Tensor,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
            meta: attention.AttentionMetadata,
        ) -> torch.Tensor:
            """Final-normed hidden states ``[T, hidden]`` of the flat token batch ``input_ids`` ``[T]``."""
            return self.forward_embeds(embedding(input_ids, self.embed_tokens), positions, kv_caches, meta)

        def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
            """The token embeddings ``[T, hidden]`` (a multimodal model overwrites image placeholders' rows)."""
            return embedding(input_ids, self.embed_tokens)

        def forward_embeds(
            self,
            inputs_embeds: torch.Tensor,
            positions: torch.Tensor,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
            meta: attention.AttentionMetadata,
        ) -> torch.Tensor:
            """:meth:`forward` from the input embeddings ``[T, hidden]``."""
            T = inputs_embeds.shape[0]
            if len(kv_caches) != self.num_layers:
                raise ValueError(f"expected {self.num_layers} (k_cache, v_cache) pairs, got {len(kv_caches)}")
            eps = self.rms_norm_eps
            scale = self.scale
            hq, d = self.num_heads, self.head_dim
            first_norm, cos, sin = self._fast
            slots = meta.slot_mapping
            need_k = meta.num_decodes < T  # prefill chunks attend to their fresh K; decodes read the cache
            if self.layer_windows is None:
                metas = [meta] * self.num_layers
            else:
                by_window = {w: dataclasses.replace(meta, sliding_window=w) for w in set(self.layer_windows)}
                metas = [by_window[w] for w in self.layer_windows]

            residual = inputs_embeds
            x = rms_norm(residual, first_norm, eps) if first_norm is not None else residual
            for (qkv_proj, qn, kn, o_proj, ln2, gate_up_proj, down_proj, ln_next), (k_cache, v_cache), m in zip(
                self._plan, kv_caches, metas
            ):
                q, k, v = rope_qkv(qkv_proj(x), positions, cos, sin, qn, kn, eps, hq, k_cache, v_cache, slots, need_k)
                o = paged_attention(q, k, v, k_cache, v_cache, m, scale, kv_written=True)
                o = o_proj(o.reshape(T, hq * d))
                x, residual = add_rms_norm(o, residual, ln2, eps)
                h = down_proj(silu_and_mul(gate_up_proj(x)))
                x, residual = add_rms_norm(h, residual, ln_next, eps)
            if not self.num_layers:
                x = rms_norm(residual, self.norm, eps)
            return x

        def pool_last(self, hidden: torch.Tensor) -> torch.Tensor:
            """Embeddings ``[N, hidden]`` float32 from last-token states (normalised per ``self.pooling``)."""
            out = hidden.float()
            if self.pooling is not None and self.pooling.normalize:
                out = F.normalize(out, dim=-1)
            return out

        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            """``[N, vocab]`` float32 logits of final-normed hidden states ``[N, hidden]``."""
            logits = self._lm_head(hidden)
            return logits if logits.dtype == torch.float32 else logits.float()

        def extra_repr(self) -> str:
            return (
                f"model_type={self.model_type}, layers={self.num_layers}, heads={self.num_heads}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, vocab={self.vocab_size}, "
                f"sliding_window={self.sliding_window}, dtype={self.dtype}"
            )

    return LlamaFamilyModel


__all__ = ["ARCHITECTURES", "expected_weights", "load", "register_model_families", "rope_inv_freq"]
