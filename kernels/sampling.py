"""Batched token sampling: greedy, temperature, min-p, top-k, top-p, seeded rows.

Order of the filters (as vLLM applies them): temperature, then min-p, then
top-k, then top-p. A row with ``temperature == 0`` is greedy (argmax of the raw
logits). Random rows are drawn by the exponential race ``argmax(p / E)`` with
``E ~ Exp(1)``, which samples exactly from ``p``; a row with its own
``torch.Generator`` (a request's ``seed``) draws ``E`` from that generator
alone, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_GREEDY_EPS = 1e-5


@dataclass
class SamplingTensors:
    """Per-row sampling parameters for ``N`` rows of logits; built by the engine each step."""

    #: ``[N]`` float32; 0 means greedy.
    temperature: torch.Tensor
    #: ``[N]`` long, 0 = off; ``None`` when no row filters by top-k.
    top_k: torch.Tensor | None = None
    #: ``[N]`` float32, 1.0 = off; ``None`` when no row filters by top-p.
    top_p: torch.Tensor | None = None
    #: ``[N]`` float32, 0.0 = off; ``None`` when no row filters by min-p.
    min_p: torch.Tensor | None = None
    #: row index -> generator, for rows that carry a seed.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    all_greedy: bool = False


# --------------------------------------------------------------------------- reference


def reference_probs(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """The distribution each non-greedy row samples from, one row at a time."""
    out = torch.zeros_like(logits, dtype=torch.float32)
    for i in range(logits.shape[0]):
        t = float(st.temperature[i])
        row = logits[i].to(torch.float32)
        if t < _GREEDY_EPS:
            out[i, int(row.argmax())] = 1.0
            continue
        probs = (row / t).softmax(-1)
        if st.min_p is not None and float(st.min_p[i]) > 0:
            probs = torch.where(probs >= float(st.min_p[i]) * probs.max(), probs, 0.0)
            probs = probs / probs.sum()
        if st.top_k is not None and 0 < int(st.top_k[i]) < row.shape[0]:
            kth = probs.topk(int(st.top_k[i])).values[-1]
            probs = torch.where(probs >= kth, probs, 0.0)
            probs = probs / probs.sum()
        if st.top_p is not None and float(st.top_p[i]) < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            before = sorted_p.cumsum(0) - sorted_p
            keep_sorted = before < float(st.top_p[i])
            keep = torch.zeros_like(keep_sorted).scatter(0, idx, keep_sorted)
            probs = torch.where(keep, probs, 0.0)
            probs = probs / probs.sum()
        out[i] = probs
    return out


def reference_sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Row by row; every random row must have a generator (the oracle is deterministic)."""
    probs = reference_probs(logits, st)
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    for i in range(logits.shape[0]):
        if float(st.temperature[i]) < _GREEDY_EPS:
            tokens[i] = int(logits[i].argmax())
            continue
        e = torch.empty(logits.shape[1], dtype=torch.float32).exponential_(generator=st.generators[i])
        tokens[i] = int((probs[i] / e).argmax())
    return tokens


# --------------------------------------------------------------------------- batched


def probs_from_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Batched :func:`reference_probs` for the random rows (greedy rows: temperature 1)."""
    logits = logits.to(torch.float32)
    temp = torch.where(st.temperature < _GREEDY_EPS, 1.0, st.temperature)
    logits = logits / temp.unsqueeze(1)
    probs = logits.softmax(-1)
    if st.min_p is not None:
        thresh = st.min_p.unsqueeze(1) * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < thresh, 0.0)
    if st.top_k is not None or st.top_p is not None:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = torch.zeros_like(sorted_p, dtype=torch.bool)
        if st.top_k is not None:
            k = torch.where(st.top_k <= 0, probs.shape[1], st.top_k).clamp(max=probs.shape[1])
            kth = sorted_p.gather(1, (k - 1).unsqueeze(1))
            drop |= sorted_p < kth
        if st.top_p is not None:
            kept = sorted_p.masked_fill(drop, 0.0)
            total = kept.sum(-1, keepdim=True)
            before = (kept.cumsum(-1) - kept) / total
            drop |= before >= st.top_p.unsqueeze(1)
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(1, idx, drop), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """``[N]`` long token ids for ``[N, V]`` logits."""
    greedy_tokens = logits.argmax(-1)
    if st.all_greedy:
        return greedy_tokens
    probs = probs_from_logits(logits, st)
    e = torch.empty_like(probs).exponential_()
    for row, gen in st.generators.items():
        e[row].exponential_(generator=gen)
    random_tokens = (probs / e).argmax(-1)
    return torch.where(st.temperature < _GREEDY_EPS, greedy_tokens, random_tokens)
