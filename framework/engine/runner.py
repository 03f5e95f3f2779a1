"""Turns a scheduled batch into tensors and runs the model on it.

:class:`ModelRunner` runs a :class:`~patchbay.model.GenerativeModel` (or a
:class:`~patchbay.model.CausalPoolingModel`) over the paged KV cache, then the
logits pipeline and the sampler; :class:`EncoderRunner` runs a
:class:`~patchbay.model.PoolingModel` over whole prompts. Both finish pooled
outputs by the model's :class:`~patchbay.model.PoolingFacts`
(:mod:`patchbay.engine.pooling`).
"""

from __future__ import annotations

import mmap
import math

import torch

from patchbay.engine.multimodal import EncoderCache, ImagePlacer
from patchbay.engine.params import TokenLogprob
from patchbay.engine.pooling import finish
from patchbay.engine.processing import process_logits
from patchbay.engine.scheduler import Batch
from patchbay.engine.sequence import Sequence
from patchbay.model import GenerativeModel, KVLayout, PoolingBatch, PoolingFacts, PoolingModel
from patchbay_kernels.attention import AttentionMetadata, PrefillChunk
from patchbay_kernels.sampling import SamplingTensors, sample


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on CPU backed by an anonymous mmap, so pages are zeroed by the OS on first touch
    instead of all at start-up (memset of a multi-GiB cache takes tens of seconds here)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def kv_block_bytes(layout: KVLayout, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layout.num_layers * block_size * layout.num_kv_heads * layout.head_dim * elem


class ModelRunner:
    def __init__(self, model: GenerativeModel, *, num_blocks: int, block_size: int,
                 pooling: PoolingFacts | None = None, seed: int | None = None, encoder_decoder: bool = False,
                 images: ImagePlacer | None = None):
        self.model = model
        #: a MultimodalModel's image placer (None: text only)
        self.images = images
        #: image encoder outputs by image hash (None: text only), counted in /metrics
        self.encoder_cache: EncoderCache | None = images.cache if images is not None else None
        self.device = model.device
        #: draws unseeded requests' tokens: each engine its own, so one model's traffic never shifts
        #: another's draws (None: torch's global generator)
        self.generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        self.block_size = block_size
        #: a CausalPoolingModel's facts (its pooled rows are finished by them); None for generation
        self.pooling = pooling
        #: the model is an EncoderDecoderModel: sequences carry encoder inputs, encoded once, and every
        #: forward gets the step's encoder states
        self.encoder_decoder = encoder_decoder
        layout = model.kv_layout
        shape = (num_blocks, block_size, layout.num_kv_heads, layout.head_dim)
        # zeros, not empty: padded decode slots are read (and masked out); garbage could hold NaNs
        self.kv_caches = [
            (lazy_zeros(shape, model.dtype, self.device), lazy_zeros(shape, model.dtype, self.device))
            for _ in range(layout.num_layers)
        ]
        if self.device.type == "cpu":
            from patchbay_kernels import cpp

            cpp.load()  # build / load now, not in the first decode step

    # ------------------------------------------------------------------ inputs

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[Sequence]]:
        bs = self.block_size
        dev = self.device
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        pool_rows: list[int] = []
        pooled: list[Sequence] = []
        decodes = batch.decodes
        ctx_lens: list[int] = []
        tables: list[list[int]] = []
        for row, seq in enumerate(decodes):
            p = seq.num_computed
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.blocks[p // bs].id * bs + p % bs)
            ctx_lens.append(p + 1)
            tables.append([b.id for b in seq.blocks])
            if p + 1 == seq.num_tokens:
                if seq.pooling is not None:
                    pool_rows.append(row)
                    pooled.append(seq)
                else:
                    sample_rows.append(row)
                    sampled.append(seq)
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decodes=len(decodes),
                                 sliding_window=self.model.sliding_window)
        if decodes:
            width = max(len(t) for t in tables)
            table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev)
            meta.decode_block_table = table  # the slots are derived from it only where a path needs them
            meta.decode_ctx_lens = torch.tensor(ctx_lens, dtype=torch.long, device=dev)
        ids_t = [torch.tensor(ids, dtype=torch.long, device=dev)] if ids else []
        pos_t = [torch.tensor(pos, dtype=torch.long, device=dev)] if pos else []
        slot_t = [torch.tensor(slots, dtype=torch.long, device=dev)] if slots else []
        start = len(decodes)
        for seq, n in batch.prefills:
            a, b = seq.num_computed, seq.num_computed + n
            ids_t.append(torch.tensor(seq.token_ids[a:b], dtype=torch.long, device=dev))
            p = torch.arange(a, b, device=dev)
            pos_t.append(p)
            table = torch.tensor([blk.id for blk in seq.blocks], dtype=torch.long, device=dev)
            ctx = torch.arange(0, b, device=dev)
            ctx_slots = table[ctx // bs] * bs + ctx % bs
            slot_t.append(ctx_slots[a:])
            meta.prefills.append(PrefillChunk(start, start + n, b, None if a == 0 else ctx_slots))
            start += n
            if b == seq.num_tokens:
                if seq.pooling is not None:
                    pool_rows.append(start - 1)
                    pooled.append(seq)
                else:
                    sample_rows.append(start - 1)
                    sampled.append(seq)
        meta.slot_mapping = torch.cat(slot_t)
        self._pool = (pool_rows, pooled)
        return torch.cat(ids_t), torch.cat(pos_t), meta, sample_rows, sampled

    def _sampling(self, seqs: list[Sequence]) -> SamplingTensors:
        params = [s.params for s in seqs]
        dev = self.device
        st = SamplingTensors(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            all_greedy=all(p.greedy for p in params),
            generator=self.generator,
        )
        if st.all_greedy:
            return st
        if any(p.top_k > 0 for p in params):
            st.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev)
        if any(p.top_p < 1.0 for p in params):
            st.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        if any(p.min_p > 0.0 for p in params):
            st.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None and not seq.params.greedy:
                if seq.generator is None:
                    seq.generator = torch.Generator(device=dev).manual_seed(seq.params.seed)
                st.generators[row] = seq.generator
        return st

    # ------------------------------------------------------------------ step

    @torch.inference_mode()
    def execute(self, batch: Batch, eos_ids: frozenset[int] = frozenset()) -> StepResult:
        """Run one step: forward, prompt logprobs, the logits pipeline, logprobs, sampling."""
        input_ids, positions, meta, rows, sampled = self._inputs(batch)
        spans = self.images.spans(batch) if self.images is not None else None
        if self.encoder_decoder:
            hidden = self.model.forward(input_ids, positions, self.kv_caches, meta, self._encoder_states(batch))
        elif spans:
            x = self.images.place(self.model.embed_input_ids(input_ids), spans)
            hidden = self.model.forward_embeds(x, positions, self.kv_caches, meta)
        else:
            hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)
        self._prompt_logprobs(batch, hidden, input_ids)
        pool_rows, pool_seqs = self._pool
        pooled: list[tuple[Sequence, torch.Tensor]] = []
        if pool_seqs:
            # decoders pool the last token's state (vLLM's default for decoder embedders)
            vectors = self.model.pool_last(hidden[pool_rows]).float().cpu()
            pooled = [(seq, finish(row, seq.pooling, self.pooling)) for seq, row in zip(pool_seqs, vectors.unbind(0))]
        if not sampled:
            return StepResult([], [], [], pooled)
        logits = self.model.compute_logits(hidden[rows] if len(rows) != hidden.shape[0] else hidden)
        process_logits(logits, sampled, eos_ids)
        dead = (logits == float("-inf")).all(-1)
        if bool(dead.any()):
            logits[dead] = 0.0  # sampled but reported as dead ends below
        lp_rows = [i for i, s in enumerate(sampled) if s.params.logprobs is not None]
        logprobs = torch.log_softmax(logits[lp_rows], -1) if lp_rows else None
        tokens = sample(logits, self._sampling(sampled)).tolist()
        entries: list[TokenLogprob | None] = [None] * len(sampled)
        if logprobs is not None:
            for j, i in enumerate(lp_rows):
                entries[i] = _entry(logprobs[j], tokens[i], sampled[i].params.logprobs,
                                    sampled[i].params.logprob_token_ids)
        for i in dead.nonzero().flatten().tolist():
            tokens[i] = -1
        return StepResult(sampled, tokens, entries, pooled)

    def _encoder_states(self, batch: Batch) -> list:
        """The step's encoder states in row order (decodes, then prefill chunks); the sequences that have
        none yet are encoded first, all in one call of the model's encoder."""
        seqs = batch.decodes + [seq for seq, _ in batch.prefills]
        fresh = [seq for seq in seqs if seq.encoder_state is None]
        if fresh:
            states = self.model.encode([seq.encoder_input for seq in fresh])
            for seq, state in zip(fresh, states):
                seq.encoder_state, seq.encoder_input = state, None
        return [seq.encoder_state for seq in seqs]

    def release(self, seq: Sequence, completed: bool) -> object:
        """Drop a finished sequence's encoder state; the model's report on it when it completed."""
        state, seq.encoder_state, seq.encoder_input = seq.encoder_state, None, None
        if state is None or not self.encoder_decoder:
            return None
        return self.model.finish_request(state, completed)

    def _prompt_logprobs(self, batch: Batch, hidden: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Log-probabilities of each prompt token given the ones before it, for the sequences that ask."""
        start = len(batch.decodes)
        for seq, n in batch.prefills:
            a = seq.num_computed
            k = seq.params.prompt_logprobs
            if k is not None and a < seq.prompt_len:
                if a == 0:
                    seq.prompt_lp = [None]
                # position j predicts token j + 1; only prompt tokens are scored
                last = min(a + n, seq.prompt_len - 1)
                if last > a:
                    lp = torch.log_softmax(self.model.compute_logits(hidden[start : start + (last - a)]), -1)
                    for j in range(last - a):
                        seq.prompt_lp.append(_entry(lp[j], seq.token_ids[a + j + 1], k))
            start += n


def _entry(lp: torch.Tensor, token: int, k: int, requested: tuple[int, ...] = ()) -> TokenLogprob:
    chosen = lp[token]
    top: list[tuple[int, float]] = []
    if k:
        values, ids = lp.topk(k)
        top = list(zip(ids.tolist(), values.tolist()))
    rank = int((lp > chosen).sum()) + 1
    asked = list(zip(requested, lp[list(requested)].tolist())) if requested else []
    return TokenLogprob(token, float(chosen), top, rank, asked)


class StepResult:
    """The sequences that got a token this step, the tokens (-1: no token was allowed), logprob entries,
    and the finished pooling sequences with their vectors."""

    __slots__ = ("seqs", "tokens", "logprobs", "pooled")

    def __init__(self, seqs: list[Sequence], tokens: list[int], logprobs: list[TokenLogprob | None],
                 pooled: list[tuple[Sequence, torch.Tensor]] | None = None):
        self.seqs = seqs
        self.tokens = tokens
        self.logprobs = logprobs
        self.pooled = pooled or []


class EncoderRunner:
    """Runs a :class:`~patchbay.model.PoolingModel` (no KV cache): each step is one forward over whole prompts
    per pooling task in it."""

    def __init__(self, model: PoolingModel, image_cache_rows: int = 0):
        self.model = model
        self.device = model.device
        self.facts = model.pooling
        #: finished image embeddings by image hash (models with image inputs), so an image is embedded once
        self.image_cache = EncoderCache(image_cache_rows)
        self.encoder_cache: EncoderCache | None = self.image_cache
        if self.device.type == "cpu":
            from patchbay_kernels import cpp

            cpp.load()  # build / load now (small batches' linears use it), not in the first request

    def _forward(self, seqs: list[Sequence], task: str) -> torch.Tensor:
        dev = self.device
        ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long, device=dev)
        types = None
        if self.facts.uses_token_type_ids:
            types = torch.tensor([t for s in seqs for t in (s.pooling.token_type_ids or [0] * s.num_tokens)],
                                 dtype=torch.long, device=dev)
        mm = [s.mm for s in seqs] if any(s.mm is not None for s in seqs) else None
        batch = PoolingBatch(input_ids=ids, seq_lens=[s.num_tokens for s in seqs], token_type_ids=types,
                             task="classify" if task == "score" else task, mm=mm)
        return self.model.pool(batch).float().cpu()

    def _cached_image(self, seq: Sequence) -> torch.Tensor | None:
        """The embedding of an image input embedded before (an image's embedding is its hash's)."""
        if seq.mm is None or len(seq.mm.items) != 1 or seq.pooling.task != "embed":
            return None
        return self.image_cache.get(seq.mm.items[0].hash)

    @torch.inference_mode()
    def execute(self, batch: Batch, eos_ids: frozenset[int] = frozenset()) -> StepResult:
        seqs = [seq for seq, _ in batch.items()]
        pooled: list[tuple[Sequence, torch.Tensor]] = []
        # one forward per model task ("score" is the classifier's forward, finished differently)
        for task in dict.fromkeys("embed" if s.pooling.task == "embed" else "classify" for s in seqs):
            group = [s for s in seqs if ("embed" if s.pooling.task == "embed" else "classify") == task]
            rows = {id(s): row for s in group if (row := self._cached_image(s)) is not None}
            run = [s for s in group if id(s) not in rows]
            if run:
                for s, row in zip(run, self._forward(run, task).unbind(0)):
                    rows[id(s)] = row
                    if task == "embed" and s.mm is not None and len(s.mm.items) == 1:
                        self.image_cache.put(s.mm.items[0].hash, row.clone())
            pooled += [(s, finish(rows[id(s)], s.pooling, self.facts)) for s in group]
        return StepResult([], [], [], pooled)
