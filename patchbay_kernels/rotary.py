"""Rotary position embedding (the "neox" / rotate-half layout transformers' llama uses).

A model builds the ``(cos, sin)`` tables once at load (:func:`cos_sin_cache`),
selects the rows of this step's positions once per forward
(``cos[positions]``, ``sin[positions]``), and every layer then calls
:func:`apply_rotary` with those rows.
"""

from __future__ import annotations

import torch

from patchbay_kernels import cpp


def cos_sin_cache(
    inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[max_positions, rotary_dim // 2]`` float32, for positions ``0..max_positions-1``."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.to(torch.float32))
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reference_apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hkv, D]``; ``cos``/``sin`` are ``[T, D // 2]``
    (the rows of each token's position). Computed in float32, cast back."""
    c = cos.unsqueeze(1)
    s = sin.unsqueeze(1)
    q_out = _rotate(q.to(torch.float32), c, s).to(q.dtype)
    k_out = _rotate(k.to(torch.float32), c, s).to(k.dtype)
    return q_out, k_out


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference_apply_rotary` on q and k at once, in six ops: float32 math (``cos``
    is float32) rounded once. Returns views of one ``[T, Hq + Hkv, D]`` tensor."""
    hq, half = q.shape[1], q.shape[2] // 2
    x = torch.cat((q, k), dim=1)
    s = sin.unsqueeze(1)
    out = x * torch.cat((cos, cos), dim=-1).unsqueeze(1)
    out[..., :half].addcmul_(x[..., half:], s, value=-1)
    out[..., half:].addcmul_(x[..., :half], s)
    out = out.to(q.dtype)
    return out[:, :hq], out[:, hq:]


def _split_qkv(qkv: torch.Tensor, num_heads: int, head_dim: int, num_kv_heads: int):
    T = qkv.shape[0]
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    return (qkv[:, :q_end].view(T, num_heads, head_dim), qkv[:, q_end:k_end].view(T, num_kv_heads, head_dim),
            qkv[:, k_end:].view(T, num_kv_heads, head_dim))


def reference_rope_qkv(qkv, positions, cos, sin, q_norm, k_norm, eps, num_heads, k_cache, v_cache, slots,
                       need_k=True):
    """Reference of :func:`rope_qkv`: split, per-head RMSNorm, rotate, write K/V at their slots."""
    from patchbay_kernels.attention import _write_kv_torch
    from patchbay_kernels.norm import reference_rms_norm

    q, k, v = _split_qkv(qkv, num_heads, k_cache.shape[3], k_cache.shape[2])
    if q_norm is not None:
        q, k = reference_rms_norm(q, q_norm, eps), reference_rms_norm(k, k_norm, eps)
    q, k = reference_apply_rotary(q, k, cos[positions], sin[positions])
    _write_kv_torch(k, v, k_cache, v_cache, slots)
    return q, k, v


def rope_qkv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    num_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    need_k: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Everything between a layer's fused q/k/v projection and its attention, in one C++ pass on CPU.

    ``qkv`` ``[T, (Hq + 2 Hkv) D]``; ``cos`` / ``sin`` the whole ``[P, D // 2]`` tables of
    :func:`cos_sin_cache`, indexed by ``positions`` ``[T]``; ``q_norm`` / ``k_norm``: per-head
    RMSNorm weights ``[D]`` applied before the rotation (Qwen3), or None. Writes the rotated K
    and V into the paged caches (``[num_blocks, block_size, Hkv, D]``) at ``slots`` ``[T]`` and
    returns ``(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D])``; ``k`` is None when not
    ``need_k`` (a decode-only step reads K from the cache). Matches :func:`reference_rope_qkv`.
    """
    from patchbay_kernels import attention, norm

    norms = () if q_norm is None else (q_norm, k_norm)
    ops = cpp.ops_for(qkv, k_cache, v_cache, *norms)
    if (ops is not None and qkv.dim() == 2 and qkv.stride(1) == 1 and k_cache.is_contiguous()
            and v_cache.is_contiguous() and k_cache.shape[3] <= 1024 and slots.dtype == torch.long
            and positions.dtype == torch.long and cos.dtype == sin.dtype == torch.float32
            and cos.is_contiguous() and sin.is_contiguous() and all(n.is_contiguous() for n in norms)):
        T, hkv, d = qkv.shape[0], k_cache.shape[2], k_cache.shape[3]
        q = torch.empty(T, num_heads, d, dtype=qkv.dtype)
        k = torch.empty(T, hkv, d, dtype=qkv.dtype) if need_k else None
        ops.rope_qkv(qkv, positions.contiguous(), cos, sin, q_norm, k_norm, eps, k_cache, v_cache,
                     slots.contiguous(), q, k)
        return q, k, qkv[:, (num_heads + hkv) * d:].view(T, hkv, d)
    q, k, v = _split_qkv(qkv, num_heads, k_cache.shape[3], k_cache.shape[2])
    if q_norm is not None:
        q, k = norm.rms_norm(q, q_norm, eps), norm.rms_norm(k, k_norm, eps)
    q, k = apply_rotary(q, k, cos.index_select(0, positions), sin.index_select(0, positions))
    attention.write_kv(k, v, k_cache, v_cache, slots)
    return q, k, v
