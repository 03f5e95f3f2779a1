"""The logits pipeline between the model and the sampler, batched over one step's rows.

In order, for the rows that need it:

1. structured-output masks (each sequence's :class:`~patchbay.decoding.Matcher`),
   ``allowed_token_ids``, ``bad_words``, and ``min_tokens`` (EOS and stop
   token ids held off until enough tokens exist, :mod:`~patchbay.engine.stopping`);
2. ``logit_bias``;
3. repetition (prompt + output), presence and frequency (output) penalties;
4. logits-processor plugins, one batched call per processor class.

Log-probabilities are taken after this pipeline (before temperature and the
top-k / top-p / min-p filters of the sampler).
"""

from __future__ import annotations

from typing import Any, Sequence as Seq

import torch

from patchbay.engine.sequence import Sequence
from patchbay.engine.stopping import held_off_ids

NEG_INF = float("-inf")


def _unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 ``[n, ceil(V/32)]`` -> bool ``[n, V]``."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(bitmask.shape[0], -1)[:, :vocab]


def _banned_bad_words(seq: Sequence) -> list[int]:
    out = seq.output_ids
    banned = []
    for word in seq.params.bad_words_ids:
        prefix = word[:-1]
        if not prefix or (len(out) >= len(prefix) and tuple(out[len(out) - len(prefix):]) == prefix):
            banned.append(word[-1])
    return banned


def process_logits(logits: torch.Tensor, seqs: Seq[Sequence], eos_ids: frozenset[int]) -> None:
    """Apply every per-request processor to ``logits`` ``[N, V]`` in place."""
    rows = [i for i, s in enumerate(seqs) if s.params.needs_processing]
    if not rows:
        return
    vocab = logits.shape[1]
    dev = logits.device

    # 1. masks ----------------------------------------------------------------
    constrained = [i for i in rows if seqs[i].matcher is not None]
    if constrained:
        bitmask = torch.zeros((len(constrained), (vocab + 31) // 32), dtype=torch.int32)
        for j, i in enumerate(constrained):
            seqs[i].matcher.fill_bitmask(bitmask, j)
        allowed = _unpack_bitmask(bitmask, vocab).to(dev)
        idx = torch.tensor(constrained, device=dev)
        logits[idx] = logits[idx].masked_fill(~allowed, NEG_INF)
    for i in rows:
        p = seqs[i].params
        row = logits[i]
        if p.allowed_token_ids is not None:
            keep = torch.full((vocab,), NEG_INF, device=dev)
            ids = torch.tensor(p.allowed_token_ids, device=dev)
            keep[ids] = 0.0
            row.add_(keep)
        if p.bad_words_ids:
            banned = _banned_bad_words(seqs[i])
            if banned:
                row[torch.tensor(banned, device=dev)] = NEG_INF
        if p.min_tokens:
            held = held_off_ids(p, eos_ids, seqs[i].num_output, vocab)
            if held:
                row[torch.tensor(held, device=dev)] = NEG_INF
        # 2. bias --------------------------------------------------------------
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=dev)
            row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=dev))

    # 3. penalties ------------------------------------------------------------
    pen = [i for i in rows if seqs[i].params.presence_penalty or seqs[i].params.frequency_penalty
           or seqs[i].params.repetition_penalty != 1.0]
    for i in pen:
        p = seqs[i].params
        row = logits[i]
        out_ids = torch.tensor(seqs[i].output_ids, dtype=torch.long, device=dev)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seqs[i].token_ids, dtype=torch.long, device=dev).unique()
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(row.dtype)
            row.sub_(counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty)

    # 4. logits-processor plugins ---------------------------------------------
    groups: dict[Any, list[int]] = {}
    for i in rows:
        for proc in seqs[i].params.logits_processors:
            groups.setdefault(type(proc), []).append(i)
    for cls, members in groups.items():
        instances = [next(p for p in seqs[i].params.logits_processors if type(p) is cls) for i in members]
        idx = torch.tensor(members, device=dev)
        sub = logits[idx]
        cls.apply_batch(instances, [seqs[i].output_ids for i in members], [seqs[i].token_ids[: seqs[i].prompt_len] for i in members], sub)
        logits[idx] = sub
