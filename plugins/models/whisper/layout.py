"""What a Whisper folder says (torch-free): sizes, checkpoint names and shapes, and the decoding tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

#: transformers' ``model_type`` of the folders this family runs
MODEL_TYPE = "whisper"


@attrs.frozen
class Layout:
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    num_mel_bins: int
    vocab_size: int
    #: encoder positions (1500: a 30 s window after the stride-2 convolution)
    max_source_positions: int
    #: decoder positions (prompt + output of one window)
    max_target_positions: int
    scale_embedding: bool
    #: the output projection is the token embedding (OpenAI's checkpoints leave ``proj_out.weight`` out)
    tied: bool


def layout_of(cfg: Any) -> Layout:
    if getattr(cfg, "model_type", None) != MODEL_TYPE:
        raise ValueError(f"whisper family: unsupported model_type {getattr(cfg, 'model_type', None)!r}")
    act = getattr(cfg, "activation_function", "gelu")
    if act != "gelu":
        raise ValueError(f"whisper family: unsupported activation_function {act!r} (only 'gelu')")
    return Layout(
        d_model=cfg.d_model, encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_heads=cfg.encoder_attention_heads, decoder_heads=cfg.decoder_attention_heads,
        encoder_ffn=cfg.encoder_ffn_dim, decoder_ffn=cfg.decoder_ffn_dim, num_mel_bins=cfg.num_mel_bins,
        vocab_size=cfg.vocab_size, max_source_positions=cfg.max_source_positions,
        max_target_positions=cfg.max_target_positions, scale_embedding=bool(getattr(cfg, "scale_embedding", False)),
        tied=bool(getattr(cfg, "tie_word_embeddings", True)),
    )


def expected_weights(lay: Layout) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(required, optional)`` checkpoint names -> shapes (``model.`` prefix, as transformers saves them)."""
    d = lay.d_model
    req: dict[str, tuple[int, ...]] = {
        "model.encoder.conv1.weight": (d, lay.num_mel_bins, 3), "model.encoder.conv1.bias": (d,),
        "model.encoder.conv2.weight": (d, d, 3), "model.encoder.conv2.bias": (d,),
        "model.encoder.embed_positions.weight": (lay.max_source_positions, d),
        "model.encoder.layer_norm.weight": (d,), "model.encoder.layer_norm.bias": (d,),
        "model.decoder.embed_tokens.weight": (lay.vocab_size, d),
        "model.decoder.embed_positions.weight": (lay.max_target_positions, d),
        "model.decoder.layer_norm.weight": (d,), "model.decoder.layer_norm.bias": (d,),
    }
    opt: dict[str, tuple[int, ...]] = {}
    (opt if lay.tied else req)["proj_out.weight"] = (lay.vocab_size, d)

    def attention(prefix: str) -> None:
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            req[f"{prefix}.{proj}.weight"] = (d, d)
            if proj != "k_proj":
                req[f"{prefix}.{proj}.bias"] = (d,)

    def block(prefix: str, ffn: int, norms: tuple[str, ...]) -> None:
        for norm in norms:
            req[f"{prefix}.{norm}.weight"] = (d,)
            req[f"{prefix}.{norm}.bias"] = (d,)
        req[f"{prefix}.fc1.weight"], req[f"{prefix}.fc1.bias"] = (ffn, d), (ffn,)
        req[f"{prefix}.fc2.weight"], req[f"{prefix}.fc2.bias"] = (d, ffn), (d,)

    for i in range(lay.encoder_layers):
        p = f"model.encoder.layers.{i}"
        attention(p + ".self_attn")
        block(p, lay.encoder_ffn, ("self_attn_layer_norm", "final_layer_norm"))
    for i in range(lay.decoder_layers):
        p = f"model.decoder.layers.{i}"
        attention(p + ".self_attn")
        attention(p + ".encoder_attn")
        block(p, lay.decoder_ffn, ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"))
    return req, opt


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
