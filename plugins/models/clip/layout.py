"""CLIP configs into layouts, and the weights a checkpoint must have (torch-free).

A CLIP tower is a pre-LayerNorm transformer encoder: ``layer_norm1`` -> attention (q/k/v/out
projections with biases) -> residual, ``layer_norm2`` -> ``fc1`` -> activation -> ``fc2`` ->
residual. The vision tower adds a patch embedding (a strided convolution without bias), a class
embedding, position embeddings, ``pre_layrnorm`` and ``post_layernorm``; the text tower token and
position embeddings and ``final_layer_norm``.
"""

from __future__ import annotations

from typing import Any

#: activation names of CLIP configs this family runs
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def tower_layout(cfg: Any) -> dict[str, Any]:
    """Sizes of one tower (a ``CLIPVisionConfig`` or ``CLIPTextConfig``)."""
    act = getattr(cfg, "hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"clip family: unsupported hidden_act {act!r} (supported: {ACTIVATIONS})")
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    if hidden % heads:
        raise ValueError(f"clip family: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    out = dict(hidden_size=hidden, intermediate_size=cfg.intermediate_size, num_layers=cfg.num_hidden_layers,
               num_heads=heads, head_dim=hidden // heads, act=act, eps=float(getattr(cfg, "layer_norm_eps", 1e-5)))
    if hasattr(cfg, "image_size") and hasattr(cfg, "patch_size"):
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"clip family: image_size {cfg.image_size} is not a multiple of patch_size "
                             f"{cfg.patch_size}")
        out.update(image_size=cfg.image_size, patch_size=cfg.patch_size,
                   num_channels=getattr(cfg, "num_channels", 3), num_positions=(cfg.image_size // cfg.patch_size) ** 2 + 1)
    else:
        out.update(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
                   eos_token_id=cfg.eos_token_id)
    return out


def encoder_weights(prefix: str, layout: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a tower's encoder layers under ``prefix`` (e.g. ``vision_model.encoder.``)."""
    h, i = layout["hidden_size"], layout["intermediate_size"]
    out: dict[str, tuple[int, ...]] = {}
    for n in range(layout["num_layers"]):
        p = f"{prefix}layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"self_attn.{proj}.weight"] = (h, h)
            out[p + f"self_attn.{proj}.bias"] = (h,)
        for norm in ("layer_norm1", "layer_norm2"):
            out[p + f"{norm}.weight"] = (h,)
            out[p + f"{norm}.bias"] = (h,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (i, h), (i,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (h, i), (h,)
    return out


def vision_weights(prefix: str, layout: dict[str, Any], *, post_layernorm: bool = True) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a vision tower under ``prefix`` (``vision_model.``)."""
    h, p, c = layout["hidden_size"], layout["patch_size"], layout["num_channels"]
    out = {
        prefix + "embeddings.class_embedding": (h,),
        prefix + "embeddings.patch_embedding.weight": (h, c, p, p),
        prefix + "embeddings.position_embedding.weight": (layout["num_positions"], h),
        prefix + "pre_layrnorm.weight": (h,),
        prefix + "pre_layrnorm.bias": (h,),
        **encoder_weights(prefix + "encoder.", layout),
    }
    if post_layernorm:
        out[prefix + "post_layernorm.weight"] = (h,)
        out[prefix + "post_layernorm.bias"] = (h,)
    return out


def text_weights(prefix: str, layout: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a text tower under ``prefix`` (``text_model.``)."""
    h = layout["hidden_size"]
    return {
        prefix + "embeddings.token_embedding.weight": (layout["vocab_size"], h),
        prefix + "embeddings.position_embedding.weight": (layout["max_position_embeddings"], h),
        **encoder_weights(prefix + "encoder.", layout),
        prefix + "final_layer_norm.weight": (h,),
        prefix + "final_layer_norm.bias": (h,),
    }


def is_buffer(name: str) -> bool:
    """Stored entries that are buffers, not weights (older checkpoints carry them)."""
    return name.endswith("position_ids")
