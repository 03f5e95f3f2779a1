"""The Whisper network: the audio encoder (once per window, batched) and the decoder over the paged cache.

Imported when a model is loaded (it imports torch). Weights come straight from
the checkpoint (:mod:`patchbay.weights`); the decoder's q/k/v are fused into one
projection (k has no bias, as in Whisper), and every decoder layer's
cross-attention keys and values are computed once per window, at encode time,
into the window's :class:`CrossState` (held by its sequence).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patchbay.model import KVLayout
from patchbay.weights import frozen, load_checked, weights_module
from patchbay_kernels.attention import AttentionMetadata, cross_decode, paged_attention
from patchbay_kernels.linear import PackedLinear
from patchbay_plugins.models.flat import FlatModel
from patchbay_plugins.models.whisper.alignment import token_times
from patchbay_plugins.models.whisper.layout import Layout, expected_weights

EPS = 1e-5


class CrossState:
    """One window's encoder output as the decoder uses it: per decoder layer, cross-attention keys and
    values ``[positions, heads, head_dim]`` (token-major, as the paged cache: decode rows read them in place
    with the C++ decode kernel); and, for word timestamps, the alignment heads' attention of
    every decoder query from ``record_from`` on."""

    __slots__ = ("keys", "values", "num_frames", "record_from", "rows")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], num_frames: int,
                 record_from: int | None):
        self.keys, self.values = keys, values
        self.num_frames = num_frames
        self.record_from = record_from
        #: decoder position -> ``[alignment heads, positions]`` float32 (written per layer)
        self.rows: dict[int, torch.Tensor] = {}


class WhisperModel(FlatModel):
    """Whisper's encoder and decoder (see the module docstring); ``processor`` is set by the family's loader."""

    def __init__(self, lay: Layout, weights: dict[str, torch.Tensor], alignment_heads: Sequence[tuple[int, int]],
                 median_filter_width: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.lay = lay
        d, self.heads = lay.d_model, lay.decoder_heads
        self.head_dim = d // lay.decoder_heads
        self.enc_head_dim = d // lay.encoder_heads
        self.scale = self.head_dim ** -0.5
        self.vocab_size = lay.vocab_size
        self.max_position_embeddings = lay.max_target_positions
        self.sliding_window = None
        self.kv_layout = KVLayout(lay.decoder_layers, lay.decoder_heads, self.head_dim)
        self.dtype, self.device = dtype, device
        self.median_filter_width = median_filter_width
        #: decoder layer -> [(head, row in the recorded alignment)]
        self.alignment: dict[int, list[tuple[int, int]]] = {}
        for row, (layer, head) in enumerate(alignment_heads):
            self.alignment.setdefault(layer, []).append((head, row))
        self.num_alignment_heads = len(alignment_heads)
        self.processor: Any = None

        def take(name: str) -> torch.Tensor:
            return weights.pop(name)

        e, dec = "model.encoder.", "model.decoder."
        self.conv1_w, self.conv1_b = frozen(take(e + "conv1.weight")), frozen(take(e + "conv1.bias"))
        self.conv2_w, self.conv2_b = frozen(take(e + "conv2.weight")), frozen(take(e + "conv2.bias"))
        self.enc_pos = frozen(take(e + "embed_positions.weight"))
        self.enc_norm_w, self.enc_norm_b = frozen(take(e + "layer_norm.weight")), frozen(take(e + "layer_norm.bias"))
        self.embed_tokens = frozen(take(dec + "embed_tokens.weight"))
        self.dec_pos = frozen(take(dec + "embed_positions.weight"))
        self.dec_norm_w, self.dec_norm_b = frozen(take(dec + "layer_norm.weight")), frozen(take(dec + "layer_norm.bias"))
        head = weights.pop("proj_out.weight", None)
        self.proj_out = frozen(head) if head is not None and not lay.tied else None
        zero = torch.zeros(d, dtype=dtype)

        def attention(p: str, fused: bool) -> dict[str, torch.Tensor]:
            q_w, k_w, v_w = take(p + "q_proj.weight"), take(p + "k_proj.weight"), take(p + "v_proj.weight")
            q_b, v_b = take(p + "q_proj.bias"), take(p + "v_proj.bias")
            out = dict(o_w=take(p + "out_proj.weight"), o_b=take(p + "out_proj.bias"))
            if fused:
                out.update(qkv_w=torch.cat([q_w, k_w, v_w]), qkv_b=torch.cat([q_b, zero, v_b]))
            else:
                out.update(q_w=q_w, q_b=q_b, k_w=k_w, v_w=v_w, v_b=v_b)
            return out

        def block(p: str, norms: Sequence[str]) -> dict[str, torch.Tensor]:
            out = {f"{n}_w": take(f"{p}{n}.weight") for n in norms} | {f"{n}_b": take(f"{p}{n}.bias") for n in norms}
            return out | dict(fc1_w=take(p + "fc1.weight"), fc1_b=take(p + "fc1.bias"),
                              fc2_w=take(p + "fc2.weight"), fc2_b=take(p + "fc2.bias"))

        self.enc_layers = nn.ModuleList(
            weights_module({**{f"sa_{k}": v for k, v in attention(f"{e}layers.{i}.self_attn.", True).items()},
                            **block(f"{e}layers.{i}.", ("self_attn_layer_norm", "final_layer_norm"))})
            for i in range(lay.encoder_layers))
        norms = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
        self.layers = nn.ModuleList(
            weights_module({**{f"sa_{k}": v for k, v in attention(f"{dec}layers.{i}.self_attn.", True).items()},
                            **{f"ca_{k}": v for k, v in attention(f"{dec}layers.{i}.encoder_attn.", False).items()},
                            **block(f"{dec}layers.{i}.", norms)})
            for i in range(lay.decoder_layers))
        if weights:
            raise ValueError(f"whisper family: unused weights {sorted(weights)[:5]}")
        self.to(device)

    @classmethod
    def from_checkpoint(cls, model_dir: Path, lay: Layout, alignment_heads: Sequence[tuple[int, int]],
                        median_filter_width: int, dtype: torch.dtype, device: torch.device) -> "WhisperModel":
        required, optional = expected_weights(lay)
        weights = load_checked(model_dir, required, optional, dtype)
        with torch.no_grad():
            return cls(lay, weights, alignment_heads, median_filter_width, dtype, device)

    def _anchor(self) -> torch.Tensor:
        return self.embed_tokens

    def _build_plan(self) -> None:
        """Packed decoder linears and the fused cross-attention K/V projection (rebuilt after ``.to()``)."""
        self._plan = [
            (PackedLinear(m.sa_qkv_w, m.sa_qkv_b), PackedLinear(m.sa_o_w, m.sa_o_b), PackedLinear(m.ca_q_w, m.ca_q_b),
             PackedLinear(m.ca_o_w, m.ca_o_b), PackedLinear(m.fc1_w, m.fc1_b), PackedLinear(m.fc2_w, m.fc2_b), m)
            for m in self.layers
        ]
        # the encoder's linears, prepacked too (1.3x F.linear's speed at its 1,500 rows a window, measured)
        self._enc_plan = [(PackedLinear(m.sa_qkv_w, m.sa_qkv_b), PackedLinear(m.sa_o_w, m.sa_o_b),
                           PackedLinear(m.fc1_w, m.fc1_b), PackedLinear(m.fc2_w, m.fc2_b), m) for m in self.enc_layers]
        # every decoder layer's cross K and V in one matmul over the encoder output
        self._cross_kv = PackedLinear(
            torch.cat([w for m in self.layers for w in (m.ca_k_w, m.ca_v_w)]),
            torch.cat([b for m in self.layers for b in (torch.zeros_like(m.ca_v_b), m.ca_v_b)]))
        self._lm_head = PackedLinear(self.proj_out if self.proj_out is not None else self.embed_tokens)

    # ------------------------------------------------------------------ encoder

    @torch.inference_mode()
    def encode(self, inputs: Sequence[Any]) -> list[CrossState]:
        """Encode several windows at once; one :class:`CrossState` each."""
        d, lay = self.lay.d_model, self.lay
        feats = torch.stack([i.features for i in inputs]).to(self.device, self.dtype)
        x = F.gelu(F.conv1d(feats, self.conv1_w, self.conv1_b, padding=1))
        x = F.gelu(F.conv1d(x, self.conv2_w, self.conv2_b, stride=2, padding=1)).transpose(1, 2)
        if x.shape[1] != self.enc_pos.shape[0]:
            raise ValueError(f"whisper: {x.shape[1]} encoder positions, the checkpoint has {self.enc_pos.shape[0]}")
        x = x + self.enc_pos
        B, S = x.shape[0], x.shape[1]
        H, D = lay.encoder_heads, self.enc_head_dim
        for qkv, o_proj, fc1, fc2, m in self._enc_plan:
            h = F.layer_norm(x, (d,), m.self_attn_layer_norm_w, m.self_attn_layer_norm_b, EPS)
            q, k, v = qkv(h).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, scale=D ** -0.5)
            x = x + o_proj(o.transpose(1, 2).reshape(B, S, d))
            h = F.layer_norm(x, (d,), m.final_layer_norm_w, m.final_layer_norm_b, EPS)
            x = x + fc2(F.gelu(fc1(h)))
        x = F.layer_norm(x, (d,), self.enc_norm_w, self.enc_norm_b, EPS)
        kv = self._cross_kv(x)  # [B, S, layers * 2 * d]
        kv = kv.view(B, S, lay.decoder_layers * 2, self.heads, self.head_dim)
        states = []
        for b, inp in enumerate(inputs):
            per = kv[b]  # [S, layers * 2, H, D]
            states.append(CrossState([per[:, 2 * i].contiguous() for i in range(lay.decoder_layers)],
                                     [per[:, 2 * i + 1].contiguous() for i in range(lay.decoder_layers)],
                                     inp.num_frames, inp.record_from if self.num_alignment_heads else None))
        return states

    # ------------------------------------------------------------------ decoder (hot path)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                encoder_states: Sequence[CrossState]) -> torch.Tensor:
        """Final-normed hidden states ``[T, d_model]`` of the step's tokens."""
        T, d = input_ids.shape[0], self.lay.d_model
        H, D = self.heads, self.head_dim
        spans = [(i, i + 1) for i in range(meta.num_decodes)] + [(c.q_start, c.q_end) for c in meta.prefills]
        x = F.embedding(input_ids, self.embed_tokens) + F.embedding(positions, self.dec_pos)
        for layer, ((qkv, o_proj, cq, co, fc1, fc2, m), (k_cache, v_cache)) in enumerate(zip(self._plan, kv_caches)):
            h = F.layer_norm(x, (d,), m.self_attn_layer_norm_w, m.self_attn_layer_norm_b, EPS)
            q, k, v = qkv(h).view(T, 3, H, D).unbind(1)
            o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
            x = x + o_proj(o.reshape(T, d))
            h = F.layer_norm(x, (d,), m.encoder_attn_layer_norm_w, m.encoder_attn_layer_norm_b, EPS)
            o = self._cross(cq(h).view(T, H, D), layer, spans, encoder_states, positions, meta.num_decodes)
            x = x + co(o.reshape(T, d))
            h = F.layer_norm(x, (d,), m.final_layer_norm_w, m.final_layer_norm_b, EPS)
            x = x + fc2(F.gelu(fc1(h)))
        return F.layer_norm(x, (d,), self.dec_norm_w, self.dec_norm_b, EPS)

    def _cross(self, q: torch.Tensor, layer: int, spans: list[tuple[int, int]], states: Sequence[CrossState],
               positions: torch.Tensor, decodes: int) -> torch.Tensor:
        """Each sequence's rows attend to its own encoder output (no mask: every position is audio or
        Whisper's padding, which it attends to as trained); the step's decode rows (the first
        ``decodes``, one query each) by one :func:`cross_decode`, a prefill chunk by SDPA."""
        out = torch.empty_like(q) if decodes < q.shape[0] else None
        if decodes:
            dec = cross_decode(q[:decodes], [(st.keys[layer], st.values[layer]) for st in states[:decodes]], self.scale)
            if out is None:
                out = dec
            else:
                out[:decodes] = dec
        heads = self.alignment.get(layer)
        for n, ((a, b), st) in enumerate(zip(spans, states)):
            keys, values = st.keys[layer], st.values[layer]  # [S, H, D]
            if n >= decodes:
                out[a:b] = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), keys.transpose(0, 1),
                                                          values.transpose(0, 1), scale=self.scale).transpose(0, 1)
            if heads and st.record_from is not None:
                self._record(q[a:b].transpose(0, 1), keys.transpose(0, 1), heads, st, positions[a:b])
        return out

    def _record(self, qs: torch.Tensor, keys: torch.Tensor, heads: list[tuple[int, int]], st: CrossState,
                positions: torch.Tensor) -> None:
        """Keep the alignment heads' attention of the rows at or after ``record_from``."""
        pos = positions.tolist()
        rows = [i for i, p in enumerate(pos) if p >= st.record_from]
        if not rows:
            return
        idx = torch.tensor([h for h, _ in heads], device=qs.device)
        sel = qs[idx][:, rows].float()  # [h, r, D]
        probs = torch.softmax(sel @ keys[idx].float().transpose(1, 2) * self.scale, dim=-1)  # [h, r, S]
        for j, i in enumerate(rows):
            row = st.rows.get(pos[i])
            if row is None:
                row = st.rows[pos[i]] = torch.zeros(self.num_alignment_heads, keys.shape[1])
            for n, (_, slot) in enumerate(heads):
                row[slot] = probs[n, j].cpu()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head(hidden)
        return logits if logits.dtype == torch.float32 else logits.float()

    def finish_request(self, state: CrossState, completed: bool) -> list[float] | None:
        """Token start times (seconds in the window) of the output after ``record_from``, when recorded."""
        rows, state.keys, state.values = state.rows, [], []
        if not completed or state.record_from is None:
            return None
        if not rows:
            return [0.0]
        weights = torch.stack([rows[p] for p in sorted(rows)], dim=1)  # [heads, rows, positions]
        return token_times(weights, state.num_frames, self.median_filter_width)
