"""The fallback's start-up self-check: the paged path against transformers' own eager attention.

Two short sequences (one longer than the smallest sliding window when that is
short) run through the paged path as the engine would run them — both prefilled
in one step, then one decoded while the other prefills a chunk after its cached
prefix — on a small cache whose blocks are handed out in reverse. Every
position's logits must equal transformers' eager forward of each sequence
alone. A model whose attention or logits depend on anything the fallback does
not reproduce (an option hidden in a mask, a logit transform it does not know)
stops start-up here, with the difference and which half (attention or logits)
disagrees, instead of serving wrong text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from patchbay_kernels.attention import AttentionMetadata, PrefillChunk
from patchbay_plugins.models.fallback.attention import ATTN_IMPLEMENTATION, UnsupportedAttention

if TYPE_CHECKING:
    from patchbay_plugins.models.fallback.causal import TransformersCausalModel

#: the probe's block size (small, so that its sequences span several blocks)
BLOCK = 4
#: allowed max |difference| of logits, relative to max(1, max |logit|), by dtype (bf16 / fp16 round at ~1e-2)
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-6}
LOW_PRECISION_TOLERANCE = 8e-2


def probe_lengths(model: TransformersCausalModel) -> tuple[int, int]:
    """Lengths of the two probe sequences: past the smallest sliding window when it is short."""
    windows = [seen.sliding_window for seen in model.layers if seen.sliding_window]
    longest = 12 if not windows or min(windows) > 40 else min(windows) + 5
    longest = min(longest, model.max_position_embeddings)
    return longest, max(3, longest - 3)


def _tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(5, vocab - 1), vocab, (n,), generator=g)


def _reference(model: TransformersCausalModel, seqs: list[torch.Tensor]) -> tuple[list, list]:
    """transformers' eager logits of each sequence alone, and our LM head on its eager hidden states."""
    hf = model.hf_model
    hf.set_attn_implementation("eager")
    try:
        logits, from_hidden = [], []
        for ids in seqs:
            ids = ids.unsqueeze(0).to(model.device)
            logits.append(hf(input_ids=ids, use_cache=False).logits[0].float())
            from_hidden.append(model.compute_logits(model.base(input_ids=ids, use_cache=False).last_hidden_state[0]))
        return logits, from_hidden
    finally:
        hf.set_attn_implementation(ATTN_IMPLEMENTATION)


def _paged(model: TransformersCausalModel, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each sequence's logits at every position through the paged path, in two engine-like steps."""
    layout, dev = model.kv_layout, model.device
    (a, b), (na, nb) = seqs, (len(seqs[0]), len(seqs[1]))
    per_seq = [-(-n // BLOCK) for n in (na, nb)]
    num_blocks = sum(per_seq) + 1
    shape = (num_blocks, BLOCK, layout.num_kv_heads, layout.head_dim)
    caches = [(torch.zeros(shape, dtype=model.dtype, device=dev), torch.zeros(shape, dtype=model.dtype, device=dev))
              for _ in range(layout.num_layers)]
    free = list(range(num_blocks - 1, 0, -1))  # reversed; block 0 unused (padding points there)
    tables = [[free.pop(0) for _ in range(k)] for k in per_seq]

    def slots(seq: int, start: int, end: int) -> torch.Tensor:
        return torch.tensor([tables[seq][p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)], device=dev)

    def run(ids, pos, meta) -> torch.Tensor:
        return model.compute_logits(model.forward(torch.cat(ids).to(dev), torch.cat(pos).to(dev), caches, meta))

    # step 1: prefill a[:na-1] and b[:nb-2], both from nothing
    meta = AttentionMetadata(slot_mapping=torch.cat([slots(0, 0, na - 1), slots(1, 0, nb - 2)]))
    meta.prefills = [PrefillChunk(0, na - 1, na - 1), PrefillChunk(na - 1, na + nb - 3, nb - 2)]
    first = run([a[: na - 1], b[: nb - 2]], [torch.arange(na - 1), torch.arange(nb - 2)], meta)
    # step 2: decode a's last token; b's last two tokens as a chunk after its cached prefix
    meta = AttentionMetadata(slot_mapping=torch.cat([slots(0, na - 1, na), slots(1, nb - 2, nb)]), num_decodes=1)
    meta.decode_block_table = torch.tensor([tables[0]], device=dev)
    meta.decode_ctx_lens = torch.tensor([na], device=dev)
    meta.prefills = [PrefillChunk(1, 3, nb, slots(1, 0, nb))]
    second = run([a[na - 1:], b[nb - 2:]], [torch.tensor([na - 1]), torch.arange(nb - 2, nb)], meta)
    return [torch.cat([first[: na - 1], second[:1]]), torch.cat([first[na - 1:], second[1:]])]


def reference(model: TransformersCausalModel) -> tuple[list, list, list]:
    """The probe's sequences with transformers' eager logits (take it before layers are swapped)."""
    na, nb = probe_lengths(model)
    seqs = [_tokens(na, model.vocab_size, 1), _tokens(nb, model.vocab_size, 2)]
    with torch.inference_mode():
        return (seqs, *_reference(model, seqs))


def self_check(model: TransformersCausalModel, ref: tuple[list, list, list] | None = None) -> float:
    """Refuse (:class:`UnsupportedAttention`) a model whose paged logits differ from transformers' eager ones
    (``ref``: :func:`reference`, taken before the model changed); returns the largest relative difference."""
    seqs, ref, from_hidden = ref or reference(model)
    with torch.inference_mode():
        ours = _paged(model, seqs)
    tol = TOLERANCE.get(model.dtype, LOW_PRECISION_TOLERANCE)
    worst = 0.0
    for r, o, h in zip(ref, ours, from_hidden):
        scale = max(1.0, float(r.abs().max()))
        diff = float((o - r).abs().max()) / scale
        worst = max(worst, diff)
        if diff > tol:
            head = float((h - r).abs().max()) / scale
            where = (f"its logits: {model.architecture} turns hidden states into logits in a way the fallback "
                     f"does not reproduce (it applies {', '.join(n for n, _ in model.logit_options) or 'none'} of "
                     f"final_logit_softcapping, logits_scaling, logit_scale)") if head > tol else (
                "its attention: an option transformers applies through a mask or a custom path that the paged "
                "attention does not see")
            raise UnsupportedAttention(
                f"{model.architecture}: the transformers fallback's start-up self-check failed — paged logits "
                f"differ from transformers' eager forward by {diff:.2e} (relative; allowed {tol:.0e}); the "
                f"difference is in {where}")
    return worst
