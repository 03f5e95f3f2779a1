"""Attention over a paged KV cache.

The cache of one layer is two tensors ``k_cache`` and ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``. A *slot* is
``block * block_size + offset``: the flat index of one token's K/V row in
``cache.view(-1, num_kv_heads, head_dim)``.

One engine step runs a flat batch of ``T`` new tokens. The decode sequences
come first, one token each; then the prefill chunks, each a contiguous run of
tokens. :class:`AttentionMetadata` describes that layout; the engine builds it
once per step and every layer reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One sequence's chunk of prompt (or recomputed) tokens in this step.

    The chunk's queries are tokens ``q_start:q_end`` of the batch. They sit at
    the end of a context of ``ctx_len`` tokens (cached prefix + chunk) and
    attend causally to it.
    """

    q_start: int
    q_end: int
    ctx_len: int
    #: ``[ctx_len]`` slots of the whole context in order, or ``None`` when the
    #: chunk is the whole context (nothing cached before it): the chunk then
    #: attends to its own fresh K/V and needs no gather.
    ctx_slots: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Layout of one step's flat token batch; built once per step by the engine."""

    #: ``[T]`` long: the slot each new token's K/V is written to.
    slot_mapping: torch.Tensor
    #: The first ``num_decodes`` tokens are decode queries, one per sequence.
    num_decodes: int = 0
    #: ``[num_decodes, max_ctx]`` long: each decode sequence's context slots
    #: (its new token included), padded on the right with slot 0.
    decode_slots: torch.Tensor | None = None
    #: ``[num_decodes]`` long: each decode sequence's context length.
    decode_ctx_lens: torch.Tensor | None = None
    #: ``[num_decodes, 1, 1, max_ctx]`` bool, True where ``decode_slots`` is real.
    decode_mask: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    #: Attend only to the last ``sliding_window`` tokens (None: everything).
    sliding_window: int | None = None


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new tokens' ``k``, ``v`` ``[T, Hkv, D]`` at their slots."""
    hkv, d = k.shape[1], k.shape[2]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v)


def _causal_mask(q_len: int, ctx_len: int, window: int | None, device) -> torch.Tensor:
    """``[q_len, ctx_len]`` bool: query i (at position ctx_len - q_len + i) sees key j."""
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device).unsqueeze(1)
    k_pos = torch.arange(ctx_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def reference_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of ``q`` ``[T, Hq, D]`` over each sequence's cached context.

    Writes ``k``, ``v`` ``[T, Hkv, D]`` into the cache first, then, one
    sequence at a time, gathers its context and computes softmax attention in
    float32 with an explicit mask. Returns ``[T, Hq, D]`` in ``q``'s dtype.
    """
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    group = hq // hkv
    flat_k = k_cache.view(-1, hkv, d)
    flat_v = v_cache.view(-1, hkv, d)
    out = torch.empty_like(q)

    def attend(qs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        ctx = slots.shape[0]
        keys = flat_k[slots].to(torch.float32).repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        vals = flat_v[slots].to(torch.float32).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs.to(torch.float32), keys) * scale
        mask = _causal_mask(qs.shape[0], ctx, meta.sliding_window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1)
        return torch.einsum("hqk,khd->qhd", probs, vals).to(q.dtype)

    for i in range(meta.num_decodes):
        n = int(meta.decode_ctx_lens[i])
        out[i : i + 1] = attend(q[i : i + 1], meta.decode_slots[i, :n])
    for chunk in meta.prefills:
        slots = chunk.ctx_slots
        if slots is None:
            slots = meta.slot_mapping[chunk.q_start : chunk.q_end]
        out[chunk.q_start : chunk.q_end] = attend(q[chunk.q_start : chunk.q_end], slots)
    return out


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same contract as :func:`reference_paged_attention`, batched: all decode
    queries in one masked SDPA call over gathered contexts; each prefill chunk
    in one SDPA call (on its fresh K/V when nothing is cached before it)."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    gqa = hq != hkv
    out = torch.empty_like(q)
    flat_k = k_cache.view(-1, hkv, d)
    flat_v = v_cache.view(-1, hkv, d)
    nd = meta.num_decodes
    if nd:
        keys = flat_k[meta.decode_slots].transpose(1, 2)  # [B, Hkv, L, D]
        vals = flat_v[meta.decode_slots].transpose(1, 2)
        qd = q[:nd].unsqueeze(2)  # [B, Hq, 1, D]
        mask = meta.decode_mask
        if meta.sliding_window is not None:
            pos = torch.arange(mask.shape[-1], device=q.device)
            lens = meta.decode_ctx_lens.view(-1, 1, 1, 1)
            mask = mask & (pos > lens - 1 - meta.sliding_window)
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[:nd] = o.squeeze(2)
    for chunk in meta.prefills:
        qs = q[chunk.q_start : chunk.q_end].transpose(0, 1)  # [Hq, n, D]
        n = qs.shape[1]
        if chunk.ctx_slots is None:
            keys = k[chunk.q_start : chunk.q_end].transpose(0, 1)
            vals = v[chunk.q_start : chunk.q_end].transpose(0, 1)
        else:
            keys = flat_k[chunk.ctx_slots].transpose(0, 1)
            vals = flat_v[chunk.ctx_slots].transpose(0, 1)
        if chunk.ctx_len == n and meta.sliding_window is None:
            o = F.scaled_dot_product_attention(qs, keys, vals, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            mask = _causal_mask(n, chunk.ctx_len, meta.sliding_window, q.device)
            o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[chunk.q_start : chunk.q_end] = o.transpose(0, 1)
    return out
