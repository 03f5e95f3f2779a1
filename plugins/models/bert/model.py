"""The bert family's model: embeddings, encoder layers and classification heads over flat batches.

The engine hands the model a FLAT batch: the tokens of B sequences
concatenated, no padding. Linear layers run on the T real tokens only;
attention (bidirectional, within each sequence) is planned per batch by
:class:`~patchbay_plugins.models.bert.attention.BatchPlan`. When pooling reads
one token per sequence (CLS, last token, the classification heads), the last
layer is run for those rows only.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patchbay.model import PoolingBatch
from patchbay.weights import frozen, load_checked, weights_module
from patchbay_kernels.linear import PackedLinear
from patchbay_plugins.models.bert.attention import BatchPlan
from patchbay_plugins.models.bert.layout import (
    ACTIVATIONS,
    checkpoint_name,
    default_pooling,
    expected_weights,
    is_ignored,
    read_layout,
)
from patchbay_plugins.models.flat import FlatModel
from patchbay_plugins.models.sentence_transformers import pool, pooled_rows, pooling_config_for, pooling_facts

layer_norm = F.layer_norm
embedding = F.embedding
tanh = torch.tanh


class BertFamilyModel(FlatModel):
    """A BERT / RoBERTa / XLM-R encoder over flat variable-length batches: a
    :class:`patchbay.model.PoolingModel` (see the module docstring)."""

    #: unequal lengths: pad (one masked SDPA call) while the padded attention work B*L^2 is at
    #: most this many times sum(n^2), else one unpadded SDPA call per sequence
    pad_waste_limit: float = 1.25

    def __init__(self, layout: dict[str, Any], weights: dict[str, torch.Tensor], pool_config, facts, dtype, device):
        super().__init__()
        self.layout = layout
        self.model_type: str = layout["model_type"]
        self.architecture: str = layout["architecture"]
        self.num_layers: int = layout["num_layers"]
        self.num_heads: int = layout["num_heads"]
        self.head_dim: int = layout["head_dim"]
        self.hidden_size: int = layout["hidden_size"]
        self.vocab_size: int = layout["vocab_size"]
        #: the longest sequence the model takes (RoBERTa: table size - padding_idx - 1)
        self.max_position_embeddings: int = layout["max_positions"]
        self.position_offset: int = layout["position_offset"]
        #: how token states become one embedding (the sentence-transformers folder's Pooling + Normalize)
        self.pool_config = pool_config
        #: what the runner and endpoints know of it (patchbay.model.PoolingFacts)
        self.pooling = facts
        self.uses_token_type_ids: bool = facts.uses_token_type_ids
        self.eps: float = layout["layer_norm_eps"]
        act_name, act_kwargs = ACTIVATIONS[layout["hidden_act"]]
        self._act = functools.partial(getattr(F, act_name), **act_kwargs)
        self.dtype = dtype
        self.device = device

        h = self.hidden_size
        take = weights.pop
        self.word_embeddings = frozen(take("embeddings.word_embeddings.weight"))
        pos = take("embeddings.position_embeddings.weight")
        types = take("embeddings.token_type_embeddings.weight", None)
        if types is None:
            types = torch.zeros(1, h, dtype=torch.float32)
        # position + token type 0 in one table, summed in float32 (the common no-token-type case)
        pos_type0 = (pos.float() + types[0].float()).to(pos.dtype)
        self.position_embeddings = frozen(pos)
        self.token_type_embeddings = frozen(types)
        self.register_buffer("position_type0", pos_type0, persistent=False)
        self.embed_ln_weight = frozen(take("embeddings.LayerNorm.weight"))
        self.embed_ln_bias = frozen(take("embeddings.LayerNorm.bias"))
        layers = []
        for n in range(self.num_layers):
            p = f"encoder.layer.{n}."
            qkv_w = torch.cat([take(p + f"attention.self.{x}.weight") for x in ("query", "key", "value")])
            qkv_b = torch.cat([take(p + f"attention.self.{x}.bias") for x in ("query", "key", "value")])
            layers.append(
                weights_module(
                    dict(
                        qkv_weight=qkv_w,
                        qkv_bias=qkv_b,
                        o_weight=take(p + "attention.output.dense.weight"),
                        o_bias=take(p + "attention.output.dense.bias"),
                        ln1_weight=take(p + "attention.output.LayerNorm.weight"),
                        ln1_bias=take(p + "attention.output.LayerNorm.bias"),
                        up_weight=take(p + "intermediate.dense.weight"),
                        up_bias=take(p + "intermediate.dense.bias"),
                        down_weight=take(p + "output.dense.weight"),
                        down_bias=take(p + "output.dense.bias"),
                        ln2_weight=take(p + "output.LayerNorm.weight"),
                        ln2_bias=take(p + "output.LayerNorm.bias"),
                    )
                )
            )
        self.layers = nn.ModuleList(layers)
        # classification head: dense + tanh on the first token, then the output projection
        if layout["classifier"]:
            if layout["roberta"]:
                names = ("classifier.dense", "classifier.out_proj")
            else:
                names = ("pooler.dense", "classifier")
            self.head_dense_weight = frozen(take(names[0] + ".weight"))
            self.head_dense_bias = frozen(take(names[0] + ".bias"))
            self.head_out_weight = frozen(take(names[1] + ".weight"))
            self.head_out_bias = frozen(take(names[1] + ".bias"))
        else:
            self.head_dense_weight = self.head_dense_bias = self.head_out_weight = self.head_out_bias = None
        self.to(device)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_checkpoint(cls, model_dir: Path, hf_config: Any, dtype, device) -> "BertFamilyModel":
        layout = read_layout(hf_config)
        pool_config = pooling_config_for(model_dir, default_pooling(layout))
        classifier = layout["classifier"]
        labels = tuple(layout["id2label"].get(i, f"LABEL_{i}") for i in range(layout["num_labels"]))
        facts = pooling_facts(model_dir, hf_config, pool_config,
                              tasks=("classify", "score") if classifier else ("embed", "score"),
                              embedding_size=0 if classifier else layout["hidden_size"], labels=labels,
                              uses_token_type_ids=layout["type_vocab_size"] > 1)
        required, optional = expected_weights(layout)
        weights = load_checked(model_dir, required, optional, dtype, rename=lambda n: checkpoint_name(n, layout),
                               skip=is_ignored)
        for name in optional:
            weights.pop(name, None)
        with torch.no_grad():
            return cls(layout, weights, pool_config, facts, dtype, device)

    def _anchor(self) -> torch.Tensor:
        return self.word_embeddings

    def _build_plan(self) -> None:
        """Flat per-layer tuples of tensors for the forward loop (rebuilt after ``.to()``)."""
        h = self.hidden_size
        self._plan = [
            (
                PackedLinear(layer.qkv_weight, layer.qkv_bias, small=False),
                PackedLinear(layer.o_weight, layer.o_bias, small=False),
                layer.ln1_weight,
                layer.ln1_bias,
                PackedLinear(layer.up_weight, layer.up_bias, small=False),
                PackedLinear(layer.down_weight, layer.down_bias, small=False),
                layer.ln2_weight,
                layer.ln2_bias,
            )
            for layer in self.layers
        ]
        # the last layer split for the "selected rows only" path: q of the rows, k/v of every token
        self._last_split = [
            (PackedLinear(layer.qkv_weight[:h], layer.qkv_bias[:h], small=False),
             PackedLinear(layer.qkv_weight[h:], layer.qkv_bias[h:], small=False))
            for layer in self.layers[-1:]
        ]
        if self.head_out_weight is not None:
            self._head = (PackedLinear(self.head_dense_weight, self.head_dense_bias, small=False),
                          PackedLinear(self.head_out_weight, self.head_out_bias, small=False))

    # ------------------------------------------------------------------ hot path

    def _check(self, input_ids: torch.Tensor, seq_lens: list[int]) -> None:
        if not seq_lens:
            raise ValueError("empty batch: seq_lens is empty")
        if min(seq_lens) <= 0:
            raise ValueError(f"every sequence needs at least one token, got lengths {list(seq_lens)}")
        if sum(seq_lens) != input_ids.shape[0]:
            raise ValueError(f"seq_lens sum to {sum(seq_lens)} but input_ids has {input_ids.shape[0]} tokens")
        if max(seq_lens) > self.max_position_embeddings:
            raise ValueError(
                f"a sequence of {max(seq_lens)} tokens exceeds the model's maximum of "
                f"{self.max_position_embeddings} tokens"
            )

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, plan: BatchPlan) -> torch.Tensor:
        T = plan.T
        pos = plan.positions
        if self.position_offset:
            pos = pos + self.position_offset
        x = embedding(input_ids, self.word_embeddings)
        if token_type_ids is not None and self.uses_token_type_ids:
            if token_type_ids.shape[0] != T:
                raise ValueError(f"token_type_ids has {token_type_ids.shape[0]} entries, input_ids {T}")
            x = x + embedding(token_type_ids, self.token_type_embeddings) + embedding(pos, self.position_embeddings)
        else:
            x = x + embedding(pos, self.position_type0)
        return layer_norm(x, (self.hidden_size,), self.embed_ln_weight, self.embed_ln_bias, self.eps)

    def _layers(self, x: torch.Tensor, plan: BatchPlan, rows: torch.Tensor | None) -> torch.Tensor:
        """Run every layer; with ``rows``, the last layer only for those flat rows (returns ``[len(rows), H]``)."""
        shape, eps, act = (self.hidden_size,), self.eps, self._act
        last = len(self._plan) - 1
        for n, (qkv_proj, o_proj, ln1w, ln1b, up_proj, down_proj, ln2w, ln2b) in enumerate(self._plan):
            if rows is not None and n == last:
                q_proj, kv_proj = self._last_split[0]
                kv = kv_proj(x)
                x = x.index_select(0, rows)
                o = plan.attend_rows(q_proj(x), kv)
            else:
                o = plan.attend(qkv_proj(x))
            x = layer_norm(o_proj(o).add_(x), shape, ln1w, ln1b, eps)
            h = act(up_proj(x))
            x = layer_norm(down_proj(h).add_(x), shape, ln2w, ln2b, eps)
        if rows is not None and not self._plan:
            x = x.index_select(0, rows)
        return x

    def forward_hidden(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, seq_lens: list[int]
    ) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` (model dtype) of the flat batch ``input_ids`` ``[T]``."""
        self._check(input_ids, seq_lens)
        plan = BatchPlan(list(seq_lens), self.num_heads, self.head_dim, input_ids.device, self.pad_waste_limit)
        return self._layers(self._embed(input_ids, token_type_ids, plan), plan, None)

    def forward_pool(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, seq_lens: list[int], task: str
    ) -> torch.Tensor:
        """One float32 row per sequence of the flat batch ``input_ids`` ``[T]`` (``seq_lens`` sum to T).

        ``task="embed"``: the pooled (and, per the ST folder, L2-normalised)
        embedding ``[B, hidden]``; ``"classify"`` / ``"score"``: the
        classification head's raw logits ``[B, num_labels]``.
        """
        seq_lens = list(seq_lens)
        self._check(input_ids, seq_lens)
        plan = BatchPlan(seq_lens, self.num_heads, self.head_dim, input_ids.device, self.pad_waste_limit)
        x = self._embed(input_ids, token_type_ids, plan)
        if task == "embed":
            rows = pooled_rows(seq_lens, self.pool_config.mode, input_ids.device)
            x = self._layers(x, plan, rows)
            return pool(x, seq_lens, self.pool_config, rows_selected=rows is not None)
        if task in ("classify", "score"):
            if self.head_out_weight is None:
                raise ValueError(f"{self.architecture} has no classification head: it runs task 'embed' only")
            x = self._layers(x, plan, pooled_rows(seq_lens, "cls", input_ids.device))
            dense, out_proj = self._head
            logits = out_proj(tanh(dense(x)))
            return logits if logits.dtype == torch.float32 else logits.float()
        raise ValueError(f"unknown task {task!r}; this model runs {self.pooling.tasks}")

    def pool(self, batch: PoolingBatch) -> torch.Tensor:
        """The contract's entry (:class:`patchbay.model.PoolingModel`): :meth:`forward_pool` of one batch."""
        return self.forward_pool(batch.input_ids, batch.token_type_ids, batch.seq_lens, batch.task)

    forward = forward_pool

    def extra_repr(self) -> str:
        return (
            f"arch={self.architecture}, layers={self.num_layers}, hidden={self.hidden_size}, "
            f"heads={self.num_heads}, vocab={self.vocab_size}, max_tokens={self.max_position_embeddings}, "
            f"labels={len(self.pooling.labels)}, pooling={self.pool_config.mode}"
            f"{'+normalize' if self.pool_config.normalize else ''}, dtype={self.dtype}"
        )

