"""Shared by the model families: a model whose forward is a flat loop over plain tensors.

Imported by the families' model modules when a model is loaded (it imports torch).
"""

from __future__ import annotations

import torch
from torch import nn


class FlatModel(nn.Module):
    """An ``nn.Module`` whose hot path runs a flat per-layer plan of plain tensors (no submodule calls, no
    hooks). The plan (:meth:`_build_plan`) is rebuilt whenever the weights move (``.to()``), and ``dtype`` /
    ``device`` follow the parameter :meth:`_anchor` names."""

    def _anchor(self) -> torch.Tensor:
        raise NotImplementedError

    def _build_plan(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if hasattr(self, "layers"):  # not during __init__, before the weights are all there
            anchor = self._anchor()
            self.dtype, self.device = anchor.dtype, anchor.device
            self._build_plan()
        return out

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
