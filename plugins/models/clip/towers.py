"""CLIP's towers over plain tensors: the shared encoder layers, the vision tower, the text tower.

Shared by the clip family (both towers, pooled and projected) and the llava family (the vision
tower's hidden states at its feature layer). Imported when a model is loaded (it imports torch).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from patchbay_kernels.linear import PackedLinear

layer_norm = F.layer_norm
sdpa = F.scaled_dot_product_attention


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation of that name (``quick_gelu``: ``x * sigmoid(1.702 x)``)."""
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unsupported activation {name!r}")


class Encoder:
    """Pre-LayerNorm transformer layers over ``[B, L, H]`` (bidirectional, or causal for text)."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, layout: dict[str, Any]):
        self.num_heads, self.head_dim = layout["num_heads"], layout["head_dim"]
        self.hidden = layout["hidden_size"]
        self.eps = layout["eps"]
        self.act = activation(layout["act"])
        self.layers = []
        for n in range(layout["num_layers"]):
            p = f"{prefix}layers.{n}."
            w = {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}
            qkv_w = torch.cat([w[f"self_attn.{x}_proj.weight"] for x in "qkv"])
            qkv_b = torch.cat([w[f"self_attn.{x}_proj.bias"] for x in "qkv"])
            self.layers.append((
                w["layer_norm1.weight"], w["layer_norm1.bias"],
                PackedLinear(qkv_w.contiguous(), qkv_b.contiguous()),
                PackedLinear(w["self_attn.out_proj.weight"], w["self_attn.out_proj.bias"]),
                w["layer_norm2.weight"], w["layer_norm2.bias"],
                PackedLinear(w["mlp.fc1.weight"], w["mlp.fc1.bias"]),
                PackedLinear(w["mlp.fc2.weight"], w["mlp.fc2.bias"]),
            ))

    def run(self, x: torch.Tensor, num_layers: int | None = None, *, causal: bool = False) -> torch.Tensor:
        """The residual stream after the first ``num_layers`` layers (all by default)."""
        B, L, H = x.shape
        nh, d, eps, act = self.num_heads, self.head_dim, self.eps, self.act
        for ln1w, ln1b, qkv, out, ln2w, ln2b, fc1, fc2 in self.layers[:num_layers]:
            h = layer_norm(x, (H,), ln1w, ln1b, eps)
            q, k, v = qkv(h).view(B, L, 3, nh, d).permute(2, 0, 3, 1, 4)
            o = sdpa(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, L, H)
            x = x + out(o)
            h = layer_norm(x, (H,), ln2w, ln2b, eps)
            x = x + fc2(act(fc1(h)))
        return x


class VisionTower:
    """CLIP's vision transformer of ``[B, C, S, S]`` pixels (S the config's ``image_size``)."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, layout: dict[str, Any]):
        self.layout = layout
        self.hidden, self.patch, self.eps = layout["hidden_size"], layout["patch_size"], layout["eps"]
        self.image_size, self.num_layers = layout["image_size"], layout["num_layers"]
        e = prefix + "embeddings."
        self.class_embedding = weights[e + "class_embedding"]
        # the convolution as one matrix product over unfolded patches
        self.patch_weight = weights[e + "patch_embedding.weight"]
        self.patch_linear = PackedLinear(self.patch_weight.reshape(self.hidden, -1).contiguous())
        self.position_embedding = weights[e + "position_embedding.weight"]
        self.pre_ln = (weights[prefix + "pre_layrnorm.weight"], weights[prefix + "pre_layrnorm.bias"])
        post = prefix + "post_layernorm."
        self.post_ln = (weights[post + "weight"], weights[post + "bias"]) if post + "weight" in weights else None
        self.encoder = Encoder(weights, prefix + "encoder.", layout)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        B, C, S, _ = pixels.shape
        if S != self.image_size or pixels.shape[3] != self.image_size:
            raise ValueError(f"pixels of {S}x{pixels.shape[3]}, the tower takes {self.image_size}x{self.image_size}")
        p, g = self.patch, S // self.patch
        patches = pixels.to(self.patch_weight.dtype).reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        x = self.patch_linear(patches.reshape(B, g * g, C * p * p))
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding
        return layer_norm(x, (self.hidden,), self.pre_ln[0], self.pre_ln[1], self.eps)

    def hidden_states(self, pixels: torch.Tensor, feature_layer: int) -> torch.Tensor:
        """transformers' ``hidden_states[feature_layer]`` (index 0: the embeddings after ``pre_layrnorm``)."""
        n = feature_layer if feature_layer >= 0 else self.num_layers + 1 + feature_layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"feature layer {feature_layer} of a {self.num_layers}-layer tower")
        return self.encoder.run(self.embed(pixels), n)

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """The class token's final state after ``post_layernorm`` ``[B, H]``."""
        x = self.encoder.run(self.embed(pixels))[:, 0]
        return layer_norm(x, (self.hidden,), self.post_ln[0], self.post_ln[1], self.eps)


class TextTower:
    """CLIP's causal text transformer, pooled at the end-of-text token as transformers pools it."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, layout: dict[str, Any]):
        self.hidden, self.eps = layout["hidden_size"], layout["eps"]
        self.eos_token_id = layout["eos_token_id"]
        e = prefix + "embeddings."
        self.token_embedding = weights[e + "token_embedding.weight"]
        self.position_embedding = weights[e + "position_embedding.weight"]
        self.final_ln = (weights[prefix + "final_layer_norm.weight"], weights[prefix + "final_layer_norm.bias"])
        self.encoder = Encoder(weights, prefix + "encoder.", layout)

    def pool_rows(self, prompts: list[list[int]]) -> list[int]:
        """The position each prompt is pooled at: its first end-of-text token (a config whose
        ``eos_token_id`` is 2 predates that fix: the highest token id, as transformers does)."""
        rows = []
        for ids in prompts:
            if self.eos_token_id == 2:
                rows.append(max(range(len(ids)), key=lambda i: (ids[i], -i)))
            else:
                rows.append(ids.index(self.eos_token_id) if self.eos_token_id in ids else len(ids) - 1)
        return rows

    def pooled(self, prompts: list[list[int]]) -> torch.Tensor:
        """``[B, H]`` pooled states of token-id prompts (right-padded into one causal batch)."""
        B, L = len(prompts), max(len(p) for p in prompts)
        dev = self.token_embedding.device
        ids = torch.zeros(B, L, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        x = F.embedding(ids, self.token_embedding) + self.position_embedding[:L]
        x = self.encoder.run(x, causal=True)  # right padding: real tokens never attend to it
        rows = torch.tensor(self.pool_rows(prompts), device=dev)
        x = x[torch.arange(B, device=dev), rows]
        return layer_norm(x, (self.hidden,), self.final_ln[0], self.final_ln[1], self.eps)
