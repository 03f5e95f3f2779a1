"""Bidirectional attention over a flat batch of whole sequences (no padding in the batch itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

sdpa = F.scaled_dot_product_attention


class BatchPlan:
    """How one flat batch of ``seq_lens`` runs bidirectional attention (built once per forward).

    Three ways, chosen by the lengths: all equal -> a plain reshape to
    ``[B, L]``, one SDPA call, no mask; lengths close to each other ->
    scatter into a zero-padded ``[B, L]`` buffer, one SDPA call with a
    key-padding mask; lengths far apart (padding would multiply the
    attention work) -> one SDPA call per sequence on views of the flat
    tensor, no padding at all.
    """

    __slots__ = ("B", "L", "T", "nh", "d", "mode", "dest", "mask", "bounds", "positions")

    def __init__(self, seq_lens: list[int], nh: int, d: int, device: torch.device, pad_waste_limit: float):
        B, T, L = len(seq_lens), sum(seq_lens), max(seq_lens)
        self.B, self.T, self.L, self.nh, self.d = B, T, L, nh, d
        self.dest = self.mask = self.bounds = None
        if B * L == T:
            self.mode = "dense"
            self.positions = torch.arange(L, device=device).repeat(B)
            return
        lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
        starts = torch.cumsum(lens, 0) - lens
        seg = torch.repeat_interleave(torch.arange(B, device=device), lens)
        self.positions = torch.arange(T, device=device) - starts.index_select(0, seg)
        if B * L * L <= pad_waste_limit * sum(n * n for n in seq_lens):
            self.mode = "padded"
            # padded row of every flat token: b * L + position
            self.dest = seg * L + self.positions
            self.mask = (torch.arange(L, device=device).unsqueeze(0) < lens.unsqueeze(1)).view(B, 1, 1, L)
        else:
            self.mode = "split"
            bounds, s = [], 0
            for n in seq_lens:
                bounds.append((s, s + n, n))
                s += n
            self.bounds = bounds

    def _heads(self, x: torch.Tensor, parts: int) -> torch.Tensor:
        """``[T, parts*nh*d]`` flat rows -> ``[parts, B, nh, L, d]`` (dense / padded modes)."""
        if self.dest is not None:
            x = x.new_zeros(self.B * self.L, x.shape[1]).index_copy_(0, self.dest, x)
        return x.view(self.B, self.L, parts, self.nh, self.d).permute(2, 0, 3, 1, 4)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention of the flat ``[T, 3H]`` q/k/v rows -> ``[T, H]``."""
        nh, d = self.nh, self.d
        if self.bounds is not None:
            outs = []
            for s, e, n in self.bounds:
                q, k, v = qkv[s:e].view(1, n, 3, nh, d).permute(2, 0, 3, 1, 4)
                outs.append(sdpa(q, k, v).transpose(1, 2).reshape(n, nh * d))
            return torch.cat(outs)
        q, k, v = self._heads(qkv, 3)
        o = sdpa(q, k, v, attn_mask=self.mask).transpose(1, 2).reshape(self.B * self.L, nh * d)
        return o if self.dest is None else o.index_select(0, self.dest)

    def attend_rows(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """One query row per sequence ``q`` ``[B, H]`` over the flat ``kv`` ``[T, 2H]`` -> ``[B, H]``."""
        nh, d, B = self.nh, self.d, self.B
        q = q.view(B, 1, nh, d).transpose(1, 2)
        if self.bounds is not None:
            outs = []
            for b, (s, e, n) in enumerate(self.bounds):
                k, v = kv[s:e].view(1, n, 2, nh, d).permute(2, 0, 3, 1, 4)
                outs.append(sdpa(q[b : b + 1], k, v))
            return torch.cat(outs).reshape(B, nh * d)
        k, v = self._heads(kv, 2)
        return sdpa(q, k, v, attn_mask=self.mask).reshape(B, nh * d)
