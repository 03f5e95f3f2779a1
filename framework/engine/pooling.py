"""What a pooling request gets back, from what a pooling model produced, by the facts it declared.

A :class:`~patchbay.model.PoolingModel` returns each prompt's embedding
(pooled and normalised as its folder says) or its class logits; the runner
finishes each row here for the request's task:

- ``embed``: a ``dimensions`` request keeps the first components (Matryoshka)
  and re-normalises them when the model's embeddings are normalised;
- ``classify``: class probabilities (softmax, or sigmoid for one label or
  multi-label models: ``PoolingFacts.classify_activation``);
- ``score``: a cross-encoder's one logit through its activation
  (``PoolingFacts.score_activation``; sigmoid unless the folder names another).

A bi-encoder's score is the cosine of two embeddings (:func:`cosine`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from patchbay.engine.params import PoolingParams
from patchbay.model import PoolingFacts


def finish(row: torch.Tensor, params: PoolingParams, facts: PoolingFacts) -> torch.Tensor:
    """One prompt's output ``row`` (float32, CPU) as the request's task wants it."""
    if params.task == "embed":
        if params.dimensions is None:
            return row
        row = row[: params.dimensions]
        return F.normalize(row, p=2.0, dim=-1) if facts.normalize else row
    if params.task == "classify":
        if facts.classify_activation == "sigmoid":
            return torch.sigmoid(row)
        return torch.softmax(row, dim=-1)
    if params.task == "score":
        x = row.reshape(-1)[:1]
        if facts.score_activation == "sigmoid":
            x = torch.sigmoid(x)
        elif facts.score_activation == "tanh":
            x = torch.tanh(x)
        return x
    raise ValueError(f"unknown pooling task {params.task!r}")


def score_value(out: torch.Tensor) -> float:
    """A finished ``score`` output as a number (NaN and infinities as 0)."""
    value = float(out.reshape(-1)[0])
    return value if math.isfinite(value) else 0.0


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    """Cosine similarity of ``a[i]`` and ``b[i]``."""
    return F.cosine_similarity(torch.stack(a), torch.stack(b), dim=-1).tolist()
