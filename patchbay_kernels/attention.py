"""Attention over a paged KV cache.

The cache of one layer is two tensors ``k_cache`` and ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``. A *slot* is
``block * block_size + offset``: the flat index of one token's K/V row in
``cache.view(-1, num_kv_heads, head_dim)``.

One engine step runs a flat batch of ``T`` new tokens. The decode sequences
come first, one token each; then the prefill chunks, each a contiguous run of
tokens. :class:`AttentionMetadata` describes that layout; the engine builds it
once per step and every layer reuses it.

On CPU the decode queries go to a C++ kernel (``csrc/paged_attention.cpp``) that reads
K/V in place from the cache blocks, and :func:`write_kv` to a C++ row copy (both built
on first use by :mod:`patchbay_kernels.cpp`). If they cannot be built, or for other
devices and dtypes, torch paths are used instead (one warning is logged);
``PATCHBAY_NO_CPP_KERNELS=1`` forces those.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from patchbay_kernels import cpp


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
    #: (its new token included), padded on the right with any valid slot. Optional when
    #: ``decode_block_table`` is given (the torch path derives it from the table then).
    decode_slots: torch.Tensor | None = None
    #: ``[num_decodes]`` long: each decode sequence's context length.
    decode_ctx_lens: torch.Tensor | None = None
    #: ``[num_decodes, max_blocks]`` int32/int64: each decode sequence's block ids, padded
    #: on the right with anything (only the first ``ceil(ctx_len / block_size)`` are read).
    #: Optional: without it the C++ decode kernel walks ``decode_slots`` instead.
    decode_block_table: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    #: Attend only to the last ``sliding_window`` tokens (None: everything).
    sliding_window: int | None = None
    #: Tensors :func:`paged_attention` derives from the fields above at the first layer and
    #: reuses at the others (not copied by ``dataclasses.replace``).
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new tokens' ``k``, ``v`` ``[T, Hkv, D]`` at their slots."""
    _write_kv(k, v, k_cache, v_cache, slot_mapping, _cpp_ops(k, k_cache))


def _write_kv(k, v, k_cache, v_cache, slot_mapping, ops) -> None:
    if ops is not None and slot_mapping.dtype == torch.long and k.stride(-1) == 1 and v.stride(-1) == 1:
        ops.write_kv(k, v, k_cache, v_cache, slot_mapping.contiguous())  # index_copy_ costs more per call
    else:
        _write_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def _write_kv_torch(k, v, k_cache, v_cache, slot_mapping) -> None:
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
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``q`` ``[T, Hq, D]`` over each sequence's cached context.

    Writes ``k``, ``v`` ``[T, Hkv, D]`` into the cache first, then, one
    sequence at a time, gathers its context and computes softmax attention in
    float32 with an explicit mask. Returns ``[T, Hq, D]`` in ``q``'s dtype.
    ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before the
    mask (Gemma 2's attention logit soft-capping).
    """
    _write_kv_torch(k, v, k_cache, v_cache, meta.slot_mapping)
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
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        mask = _causal_mask(qs.shape[0], ctx, meta.sliding_window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1)
        return torch.einsum("hqk,khd->qhd", probs, vals).to(q.dtype)

    if meta.num_decodes:
        decode_slots = _decode_slots(meta, k_cache.shape[1], k_cache.shape[0] * k_cache.shape[1])
    for i in range(meta.num_decodes):
        n = int(meta.decode_ctx_lens[i])
        out[i : i + 1] = attend(q[i : i + 1], decode_slots[i, :n])
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
    kv_written: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same contract as :func:`reference_paged_attention`, batched: all decode
    queries at once (on CPU by the C++ kernel reading the cache blocks in place, else
    over their gathered contexts); each prefill chunk in one flash-attention call (on
    its fresh K/V when nothing is cached before it).

    ``kv_written``: ``k`` and ``v`` are already at their slots (written by
    :func:`patchbay_kernels.rotary.rope_qkv`); they may then be None when the step
    has no prefill chunks, as only those read them.

    ``softcap`` (Gemma 2): scores are soft-capped before the mask; decodes then take the
    torch path and prefill chunks an explicit-score path (:func:`_prefill_softcap`)."""
    ops = _cpp_ops(q, k_cache)
    if not kv_written:
        _write_kv(k, v, k_cache, v_cache, meta.slot_mapping, ops)
    if softcap:
        ops = None  # the C++ decode kernel does not cap
    if meta.num_decodes == q.shape[0] and ops is not None:  # decodes only, the C++ output is fresh and contiguous
        return _decode(q, k_cache, v_cache, meta, scale, ops).contiguous()
    parts = []
    if meta.num_decodes:
        parts.append((0, meta.num_decodes,
                      _decode(q[: meta.num_decodes], k_cache, v_cache, meta, scale, ops, softcap)))
    for chunk in meta.prefills:
        a, b = chunk.q_start, chunk.q_end
        if softcap:
            o = _prefill_softcap(q[a:b], k[a:b], v[a:b], k_cache, v_cache, chunk, meta.sliding_window, scale, softcap)
        else:
            o = _prefill(q[a:b], k[a:b], v[a:b], k_cache, v_cache, chunk, meta.sliding_window, scale)
        parts.append((a, b, o))
    if len(parts) == 1 and parts[0][1] - parts[0][0] == q.shape[0]:
        return parts[0][2].contiguous()
    out = torch.empty_like(q)
    for a, b, o in parts:
        out[a:b] = o
    return out


_workspace = threading.local()


def _buffer(numel: int, dtype: torch.dtype, device: torch.device, tag: str) -> torch.Tensor:
    """A 1-D scratch tensor kept per thread and ``tag``, valid until the next call with
    that tag (it grows to the largest size asked for and is never freed).

    Reusing it matters on CPU: a fresh multi-MB tensor per layer makes glibc map new
    pages every time, and those page faults cost several times the copy itself.
    """
    bufs = _workspace.__dict__.setdefault("bufs", {})
    key = (tag, dtype, device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # an inference tensor could not be written outside that mode
            buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _gather(table: torch.Tensor, rows: torch.Tensor, tag: str) -> torch.Tensor:
    """``table.index_select(0, rows)`` into the scratch buffer ``tag``."""
    out = _buffer(rows.shape[0] * table.shape[1], table.dtype, table.device, tag).view(-1, table.shape[1])
    return torch.index_select(table, 0, rows, out=out)


def _decode_slots(meta: AttentionMetadata, block_size: int, num_slots: int) -> torch.Tensor:
    """``meta.decode_slots``, or (once per step) the slots its block table spells out."""
    if meta.decode_slots is not None:
        return meta.decode_slots
    table, lens = meta.decode_block_table, meta.decode_ctx_lens
    hit = meta._derived.get("slots")
    if hit is not None and hit[0] is table and hit[1] is lens and hit[2] == block_size:
        return hit[3]
    B, max_ctx = table.shape[0], int(lens.max()) if lens.numel() else 0
    need = -(-max_ctx // block_size)
    offsets = torch.arange(block_size, device=table.device)
    slots = (table[:, :need].to(torch.long).unsqueeze(2) * block_size + offsets).view(B, -1)[:, :max_ctx]
    slots = slots.clamp(0, num_slots - 1)  # the table's padding may be anything: any valid slot will do (masked)
    meta._derived["slots"] = (table, lens, block_size, slots)
    return slots


def _decode_plan(meta: AttentionMetadata, num_kv_heads: int, block_size: int,
                 num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [B * Hkv * L], bias [B * Hkv, 1, L])`` of the decode queries, derived at the
    first layer of a step: the cache rows (one per slot and KV head) that make up the
    head-major context ``[B, Hkv, L, D]``, and the additive float32 mask."""
    slots, lens, window = _decode_slots(meta, block_size, num_slots), meta.decode_ctx_lens, meta.sliding_window
    hit = meta._derived.get("decode")
    if hit is not None and hit[0] is slots and hit[1] is lens and hit[2] == (window, num_kv_heads):
        return hit[3]
    B, L = slots.shape
    heads = torch.arange(num_kv_heads, device=slots.device).view(1, -1, 1)
    rows = (slots.unsqueeze(1) * num_kv_heads + heads).reshape(-1)
    pos = torch.arange(L, device=slots.device)
    lens = lens.view(B, 1)
    keep = pos < lens
    if window is not None:
        keep &= pos >= lens - window
    bias = torch.zeros(B, L, device=slots.device).masked_fill_(~keep, float("-inf"))
    bias = bias.repeat_interleave(num_kv_heads, dim=0).view(B * num_kv_heads, 1, L)
    meta._derived["decode"] = (slots, meta.decode_ctx_lens, (window, num_kv_heads), (rows, bias))
    return rows, bias


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
            ops, softcap: float | None = None) -> torch.Tensor:
    """One query per sequence: the C++ kernel (``ops``), reading K/V in place, when it applies;
    else :func:`_decode_torch`."""
    if ops is not None and q.shape[-1] % 16:
        _warn_once(f"head_dim {q.shape[-1]} is not a multiple of 16")
        ops = None
    if ops is None:
        return _decode_torch(q, k_cache, v_cache, meta, scale, softcap)
    table, block_size, lens, window = _cpp_decode_args(meta, k_cache.shape[1])
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    ops.paged_decode(q if q.stride(-1) == 1 else q.contiguous(), k_cache, v_cache, table, block_size, lens, scale,
                     window, out)
    return out


def _cpp_decode_args(meta: AttentionMetadata, block_size: int) -> tuple[torch.Tensor, int, torch.Tensor, int]:
    """``(table, block_size, ctx_lens, window)`` of the C++ decode op, derived at the first layer of a step.
    Without a block table the slots are the table: blocks of one row, the cache seen as ``[slots, 1, Hkv, D]``."""
    key = (meta.decode_block_table, meta.decode_slots, meta.decode_ctx_lens, meta.sliding_window, block_size)
    hit = meta._derived.get("cpp_decode")
    if hit is not None and all(a is b for a, b in zip(hit[0][:3], key[:3])) and hit[0][3:] == key[3:]:
        return hit[1]
    table = meta.decode_block_table
    if table is None:
        table, block_size = meta.decode_slots, 1
    table = table.to(torch.long)
    if table.stride(-1) != 1:
        table = table.contiguous()
    args = (table, block_size, meta.decode_ctx_lens.to(torch.long).contiguous(), meta.sliding_window or 0)
    meta._derived["cpp_decode"] = (key, args)
    return args


def _decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, softcap: float | None = None):
    """One query per sequence against its gathered context: two batched matmuls over
    (sequence, KV head) pairs, the query heads of a group as rows (SDPA's CPU kernel is
    slower for a single query, much slower in bf16). Scores and softmax in float32;
    ``softcap`` caps the scores before the mask."""
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    rows, bias = _decode_plan(meta, hkv, k_cache.shape[1], k_cache.shape[0] * k_cache.shape[1])
    keys = _gather(k_cache.view(-1, d), rows, "k").view(B * hkv, -1, d)  # head-major [B * Hkv, L, D]
    vals = _gather(v_cache.view(-1, d), rows, "v").view(B * hkv, -1, d)
    if keys.dtype != torch.float32:  # bf16 scores would be off by ~1e-2 at large logits
        keys = _buffer(keys.numel(), torch.float32, keys.device, "k32").view(keys.shape).copy_(keys)
    qg = q.reshape(B * hkv, hq // hkv, d).float()
    if softcap:
        scores = torch.bmm(qg, keys.transpose(1, 2)).mul_(scale / softcap).tanh_().mul_(softcap).add_(bias)
    else:
        scores = torch.baddbmm(bias, qg, keys.transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, dim=-1).to(vals.dtype), vals).view(B, hq, d)


def _prefill(q, k, v, k_cache, v_cache, chunk: PrefillChunk, window: int | None, scale: float) -> torch.Tensor:
    n, hq, d = q.shape
    hkv = k.shape[1]
    if chunk.ctx_slots is not None:
        k = _gather(k_cache.view(-1, hkv * d), chunk.ctx_slots, "k").view(-1, hkv, d)
        v = _gather(v_cache.view(-1, hkv * d), chunk.ctx_slots, "v").view(-1, hkv, d)
    # 4-D [1, H, n, D] views: SDPA's CPU flash kernel only takes 4-D inputs (3-D ones go
    # to the math path, which materialises the [H, n, ctx] scores)
    q4, k4, v4 = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
    if chunk.ctx_len == n and window is None:
        o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=hq != hkv)
    else:
        mask = _causal_mask(n, chunk.ctx_len, window, q.device)
        o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
    return o[0].transpose(0, 1)


#: query rows per block of :func:`_prefill_softcap` (bounds its ``[Hq, rows, ctx]`` float32 scores)
SOFTCAP_QUERY_BLOCK = 256


def _prefill_softcap(q, k, v, k_cache, v_cache, chunk: PrefillChunk, window: int | None, scale: float,
                     softcap: float) -> torch.Tensor:
    """A prefill chunk with soft-capped scores (SDPA cannot cap): explicit float32 scores, capped, masked
    and softmaxed, a block of query rows at a time."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    if chunk.ctx_slots is not None:
        k = _gather(k_cache.view(-1, hkv * d), chunk.ctx_slots, "k").view(-1, hkv, d)
        v = _gather(v_cache.view(-1, hkv * d), chunk.ctx_slots, "v").view(-1, hkv, d)
    group = hq // hkv
    keys = k.transpose(0, 1).float().repeat_interleave(group, dim=0)  # [Hq, ctx, D]
    vals = v.transpose(0, 1).float().repeat_interleave(group, dim=0)
    mask = _causal_mask(n, chunk.ctx_len, window, q.device)
    out = torch.empty(n, hq, d, dtype=q.dtype, device=q.device)
    for a in range(0, n, SOFTCAP_QUERY_BLOCK):
        b = min(n, a + SOFTCAP_QUERY_BLOCK)
        scores = torch.matmul(q[a:b].transpose(0, 1).float(), keys.transpose(1, 2))  # [Hq, rows, ctx]
        scores.mul_(scale / softcap).tanh_().mul_(softcap).masked_fill_(~mask[a:b], float("-inf"))
        out[a:b] = torch.matmul(scores.softmax(-1), vals).transpose(0, 1).to(q.dtype)
    return out


# --------------------------------------------------------------------------- the C++ kernels


def _warn_once(reason: str) -> None:
    cpp.warn_once("paged attention: " + reason)


def _cpp_ops(x: torch.Tensor, cache: torch.Tensor):
    """The C++ ops if they apply to ``x`` and ``cache`` (else None, the reason logged once)."""
    if not cpp.enabled():
        return None
    if x.device.type != "cpu":
        _warn_once(f"tensors on {x.device.type}")
        return None
    if x.dtype not in (torch.float32, torch.bfloat16) or cache.dtype != x.dtype:
        _warn_once(f"{x.dtype} with a {cache.dtype} cache")
        return None
    if not cache.is_contiguous():
        _warn_once("a non-contiguous KV cache")
        return None
    return cpp.load()


# --------------------------------------------------------------------------- one query against dense K/V


def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per head ``q`` ``[H, D]`` against a whole unmasked context ``k``, ``v`` ``[S, H, D]``
    (token-major: an encoder-decoder's cross-attention); ``[H, D]``.

    On CPU the C++ ``dense_decode`` (``csrc/dense_attention.cpp``) reads K, then V, once each front to
    back, near the memory's speed (SDPA's CPU kernel and the paged decode kernel take 1.5-2x as long
    for a single query over a long context); else SDPA."""
    S, H, D = k.shape
    ops = cpp.ops_for(q, k, v) if k.is_contiguous() and v.is_contiguous() and D % 16 == 0 and S else None
    if ops is None:
        return F.scaled_dot_product_attention(q.unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1),
                                              scale=scale).squeeze(1)
    out = torch.empty(H, D, dtype=q.dtype)
    ops.dense_decode(q if q.is_contiguous() else q.contiguous(), k, v, scale, out)
    return out


def cross_decode(q: torch.Tensor, contexts: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """Every decode row of a step against its own whole, unmasked context: ``q`` ``[N, H, D]``, row ``n``
    against ``contexts[n]`` = ``(k, v)`` ``[S_n, H, D]`` token-major; ``[N, H, D]``.

    On CPU one C++ ``cross_decode`` call (``csrc/dense_attention.cpp``): each row in two halves of its
    context, merged, the halves shared out over torch's threads, or over the caller and the kernels'
    helper thread when torch runs on one; a row's answer depends neither on the thread count nor on the
    other rows (it may differ from :func:`dense_decode`'s in the last bits). Else (other devices, or
    contexts the kernel does not take: non-contiguous) one :func:`dense_decode` per row."""
    N, H, D = q.shape
    ops = cpp.ops_for(q, *(t for kv in contexts for t in kv)) if D % 16 == 0 and N else None
    if ops is not None and all(k.is_contiguous() and v.is_contiguous() and k.shape == v.shape
                               and k.shape[0] > 0 and k.shape[1:] == (H, D) for k, v in contexts):
        table = torch.tensor([[k.data_ptr(), v.data_ptr(), k.shape[0], 0] for k, v in contexts], dtype=torch.int64)
        out = torch.empty(N, H, D, dtype=q.dtype)
        ops.cross_decode(q if q.is_contiguous() else q.contiguous(), table, scale, out)  # contexts stay referenced
        return out
    return torch.stack([dense_decode(q[n], k, v, scale) for n, (k, v) in enumerate(contexts)]) if N else q.new_empty(q.shape)
