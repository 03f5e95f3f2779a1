"""Batched token sampling: greedy, temperature, min-p, top-k, top-p, seeded rows.

Order of the filters (as vLLM applies them): temperature, then min-p, then
top-k, then top-p; ties with the last token a top-k or top-p filter keeps are
kept too. A row with ``temperature == 0`` is greedy (argmax of the raw logits).
A random row is drawn by inverting its CDF (vocabulary order) at one uniform
``u``; a row with its own ``torch.Generator`` (a request's ``seed``) draws
``u`` from that generator alone, so its tokens do not depend on what else is
in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_GREEDY_EPS = 1e-5
#: ``u * _U_SCALE * total < total`` in float32 for every ``u`` torch.rand returns, so a
#: token with zero probability is never drawn.
_U_SCALE = 1.0 - 2.0**-23


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
    #: draws the other random rows (an engine's own, seeded by ``--seed``); None: torch's global one.
    generator: torch.Generator | None = None
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
            cut = sorted_p[max(int(keep_sorted.sum()) - 1, 0)]  # the last kept value
            probs = torch.where(probs >= cut, probs, 0.0)
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
        u = torch.rand(1, generator=st.generators[i]) * _U_SCALE
        cdf = probs[i].cumsum(0)
        tokens[i] = int((cdf <= u * cdf[-1]).sum())  # first token whose cdf exceeds u * total
    return tokens


# --------------------------------------------------------------------------- batched


def probs_from_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Batched :func:`reference_probs` for the random rows (greedy rows: temperature 1).

    top-k and top-p find each row's cut-off value with ``topk`` over as few
    candidates as needed (a full sort of the vocabulary is very slow on CPU).
    """
    temp = torch.where(st.temperature < _GREEDY_EPS, 1.0, st.temperature).unsqueeze(1)
    probs = torch.softmax(logits.to(torch.float32) / temp, dim=-1)
    if st.min_p is not None:
        probs.masked_fill_(probs < st.min_p.unsqueeze(1) * probs.amax(-1, keepdim=True), 0.0)
    vocab = probs.shape[1]
    top = None  # the largest probabilities of each row, in order
    if st.top_k is not None:
        on = ((st.top_k > 0) & (st.top_k < vocab)).unsqueeze(1)
        k = torch.where(on, st.top_k.unsqueeze(1), 0)
        kmax = int(k.max())
        if kmax > 0:
            top = probs.topk(kmax, dim=-1).values
            kth = top.gather(1, (k - 1).clamp(min=0))
            probs.masked_fill_((probs < kth) & on, 0.0)
            top.masked_fill_((top < kth) & on, 0.0)
    if st.top_p is not None:
        on = st.top_p.unsqueeze(1) < 1.0
        limit = st.top_p.unsqueeze(1) * probs.sum(-1, keepdim=True)
        if top is None:
            top = probs.topk(min(64, vocab), dim=-1).values
        while True:  # widen the candidates until every row's nucleus is among them
            cum = top.cumsum(-1)
            if top.shape[1] == vocab or bool(((cum[:, -1:] >= limit) | ~on).all()):
                break
            top = probs.topk(min(8 * top.shape[1], vocab), dim=-1).values
        kept = ((cum - top) < limit).sum(-1, keepdim=True)  # tokens whose preceding mass < top_p
        cut = top.gather(1, (kept - 1).clamp(min=0))
        probs.masked_fill_((probs < cut) & on, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """``[N]`` long token ids for ``[N, V]`` logits."""
    if st.all_greedy:
        return logits.argmax(-1)
    cdf = probs_from_logits(logits, st).cumsum_(-1)
    u = torch.rand(logits.shape[0], 1, device=logits.device, generator=st.generator)
    for row, gen in st.generators.items():
        u[row] = torch.rand(1, generator=gen, device=gen.device)
    tokens = torch.searchsorted(cdf, u.mul_(_U_SCALE).mul_(cdf[:, -1:]), right=True).squeeze(1)
    greedy = st.temperature < _GREEDY_EPS
    if bool(greedy.any()):
        tokens = torch.where(greedy, logits.argmax(-1), tokens)
    return tokens
