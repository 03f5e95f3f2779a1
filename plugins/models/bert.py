"""The "bert" model family: BERT-style bidirectional encoders for embed / classify / score.

Covers ``BertModel``, ``RobertaModel`` and ``XLMRobertaModel`` (task
``embed``: pooled, optionally L2-normalised sentence embeddings, as the
model's sentence-transformers folder says) and their
``...ForSequenceClassification`` heads (tasks ``classify`` and ``score``:
cross-encoders' raw logits). Weights come straight from the checkpoint's
safetensors (:mod:`patchbay.weights`), with query/key/value fused into one
projection.

The engine hands the model a FLAT batch: the tokens of B sequences
concatenated, no padding. Linear layers run on the T real tokens only;
attention (bidirectional, within each sequence) is one SDPA call over
``[B, L]`` when every sequence has the same length, one SDPA call over q/k/v
padded to the longest sequence with a key-padding mask when the lengths are
close, and one SDPA call per sequence (no padding) when they are far apart. When pooling reads one token per
sequence (CLS, last token, the classification heads), the last layer is run
for those rows only.

Module import is light (no torch); torch is imported when a model is loaded.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from patchbay import hookimpl
from patchbay.registry import ModelFamily

EMBED_ARCHITECTURES = ("BertModel", "RobertaModel", "XLMRobertaModel")
CLASSIFY_ARCHITECTURES = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
)
ARCHITECTURES = EMBED_ARCHITECTURES + CLASSIFY_ARCHITECTURES
_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
#: hidden_act -> (torch.nn.functional name, kwargs); the tanh GELUs are one formula in three spellings
_ACTIVATIONS = {
    "gelu": ("gelu", {}),
    "gelu_new": ("gelu", {"approximate": "tanh"}),
    "gelu_fast": ("gelu", {"approximate": "tanh"}),
    "gelu_pytorch_tanh": ("gelu", {"approximate": "tanh"}),
    "relu": ("relu", {}),
    "silu": ("silu", {}),
    "swish": ("silu", {}),
}
TASKS = ("embed", "classify", "score")


@hookimpl
def register_model_families(register):
    register(ModelFamily(name="bert", architectures=EMBED_ARCHITECTURES, tasks=frozenset({"embed"}), load=load))
    register(
        ModelFamily(
            name="bert", architectures=CLASSIFY_ARCHITECTURES, tasks=frozenset({"classify", "score"}), load=load
        )
    )


def load(model_dir: Path, hf_config: Any, dtype: Any, device: Any):
    """Build the encoder of ``model_dir`` (config ``hf_config``) in ``dtype`` on ``device``.

    Returns an ``nn.Module`` with ``forward_pool(input_ids, token_type_ids,
    seq_lens, task)`` -> float32 ``[B, out]`` (see :class:`BertFamilyModel`,
    built lazily) and the attributes the engine reads (``kind``,
    ``hidden_size``, ``max_position_embeddings``, ``num_labels``,
    ``id2label``, ``pooling``, ``max_seq_length``, ``uses_token_type_ids``).
    """
    return _model_class().from_checkpoint(Path(model_dir), hf_config, dtype, device)


# --------------------------------------------------------------------------- config helpers (torch-free)


@functools.lru_cache(maxsize=None)
def _model_class():
    """The model class; defined on first use so that importing the plugin does not import torch."""
    return _define_model_class()


def _layout(cfg: Any) -> dict[str, Any]:
    """Everything the weights and the forward need to know about ``cfg``."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"bert family: unsupported model_type {model_type!r} (supported: {_MODEL_TYPES})")
    archs = list(getattr(cfg, "architectures", None) or [])
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"bert family: unsupported architectures {archs} (supported: {ARCHITECTURES})")
    act = getattr(cfg, "hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"bert family: unsupported hidden_act {act!r} (supported: {sorted(_ACTIVATIONS)})")
    pos_type = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
    if pos_type != "absolute":
        raise ValueError(f"bert family: unsupported position_embedding_type {pos_type!r} (only 'absolute')")
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError("bert family: decoder / cross-attention configs are not supported (encoders only)")
    hidden, num_heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    if hidden % num_heads:
        raise ValueError(f"bert family: hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}")
    roberta = model_type != "bert"
    pad = getattr(cfg, "pad_token_id", None)
    if roberta and pad is None:
        raise ValueError(f"bert family: {model_type} config needs pad_token_id (positions start after it)")
    max_pos = int(cfg.max_position_embeddings)
    # RoBERTa numbers positions from padding_idx + 1: the usable length is shorter than the table
    position_offset = int(pad) + 1 if roberta else 0
    classifier = arch in CLASSIFY_ARCHITECTURES
    id2label = {int(k): str(v) for k, v in (getattr(cfg, "id2label", None) or {}).items()} if classifier else {}
    num_labels = int(getattr(cfg, "num_labels", len(id2label))) if classifier else 0
    if classifier and not id2label:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    return dict(
        model_type=model_type,
        architecture=arch,
        roberta=roberta,
        classifier=classifier,
        base_prefix="roberta" if roberta else "bert",
        hidden_size=hidden,
        num_heads=num_heads,
        head_dim=hidden // num_heads,
        num_layers=int(cfg.num_hidden_layers),
        intermediate_size=int(cfg.intermediate_size),
        vocab_size=int(cfg.vocab_size),
        type_vocab_size=int(getattr(cfg, "type_vocab_size", 2) or 0),
        max_position_table=max_pos,
        position_offset=position_offset,
        max_positions=max_pos - position_offset,
        layer_norm_eps=float(getattr(cfg, "layer_norm_eps", 1e-12)),
        hidden_act=act,
        num_labels=num_labels,
        id2label=id2label,
    )


def expected_weights(layout: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(required, optional)``: checkpoint name (base-model prefix stripped) -> shape, for a layout."""
    h, i, v = layout["hidden_size"], layout["intermediate_size"], layout["vocab_size"]
    req: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (v, h),
        "embeddings.position_embeddings.weight": (layout["max_position_table"], h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    opt: dict[str, tuple[int, ...]] = {}
    if layout["type_vocab_size"]:
        req["embeddings.token_type_embeddings.weight"] = (layout["type_vocab_size"], h)
    for n in range(layout["num_layers"]):
        p = f"encoder.layer.{n}."
        for name, shape in (
            ("attention.self.query", (h, h)),
            ("attention.self.key", (h, h)),
            ("attention.self.value", (h, h)),
            ("attention.output.dense", (h, h)),
            ("intermediate.dense", (i, h)),
            ("output.dense", (h, i)),
        ):
            req[p + name + ".weight"] = shape
            req[p + name + ".bias"] = (shape[0],)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            req[p + name + ".weight"] = (h,)
            req[p + name + ".bias"] = (h,)
    pooler = {"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
    labels = layout["num_labels"]
    if layout["classifier"] and not layout["roberta"]:  # BERT: pooler (dense + tanh on [CLS]) -> classifier
        req.update(pooler)
        req.update({"classifier.weight": (labels, h), "classifier.bias": (labels,)})
    else:
        opt.update(pooler)  # bare encoders often ship the pooler; embeddings do not use it
    if layout["classifier"] and layout["roberta"]:  # RoBERTa head: dense + tanh on <s> -> out_proj
        req.update(
            {
                "classifier.dense.weight": (h, h),
                "classifier.dense.bias": (h,),
                "classifier.out_proj.weight": (labels, h),
                "classifier.out_proj.bias": (labels,),
            }
        )
    return req, opt


def _is_ignored(name: str) -> bool:
    """Checkpoint entries that never matter for inference: buffers and pre-training heads."""
    return name.endswith((".position_ids", ".token_type_ids")) or name.startswith(("cls.", "lm_head."))


def checkpoint_name(name: str, layout: dict[str, Any]) -> str:
    """The canonical name of a checkpoint entry: base-model prefix stripped, legacy gamma/beta renamed."""
    prefix = layout["base_prefix"] + "."
    if name.startswith(prefix):
        name = name[len(prefix) :]
    if name.endswith(".gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith(".beta"):
        name = name[: -len("beta")] + "bias"
    return name


def default_pooling(layout: dict[str, Any]):
    """Pooling when the folder has no sentence-transformers files: CLS for classifiers, else mean."""
    from patchbay_plugins.models.sentence_transformers import PoolingConfig

    return PoolingConfig(mode="cls" if layout["classifier"] else "mean", normalize=False)


# --------------------------------------------------------------------------- the model


def _define_model_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    from patchbay_plugins.models.sentence_transformers import pool, pooled_rows, pooling_config_for
    from patchbay.weights import CheckpointError, check_names, iter_safetensors
    from patchbay_kernels.linear import PackedLinear

    layer_norm = F.layer_norm
    embedding = F.embedding
    sdpa = F.scaled_dot_product_attention
    tanh = torch.tanh

    def _param(t: torch.Tensor | None) -> nn.Parameter | None:
        return None if t is None else nn.Parameter(t, requires_grad=False)

    class EncoderLayer(nn.Module):
        """One encoder layer's (fused) weights; the forward lives in the model's flat loop."""

        def __init__(self, w: dict[str, torch.Tensor | None]):
            super().__init__()
            for name, t in w.items():
                self.register_parameter(name, _param(t))

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

    class BertFamilyModel(nn.Module):
        """A BERT / RoBERTa / XLM-R encoder over flat variable-length batches (see the module docstring)."""

        kind = "encoder"
        #: unequal lengths: pad (one masked SDPA call) while the padded attention work B*L^2 is at
        #: most this many times sum(n^2), else one unpadded SDPA call per sequence
        pad_waste_limit: float = 1.25

        def __init__(self, layout: dict[str, Any], weights: dict[str, torch.Tensor], pooling, dtype, device):
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
            self.num_labels: int = layout["num_labels"]
            self.id2label: dict[int, str] = dict(layout["id2label"])
            self.pooling = pooling
            self.max_seq_length: int | None = pooling.max_seq_length
            self.uses_token_type_ids: bool = layout["type_vocab_size"] > 1
            self.tasks: tuple[str, ...] = ("classify", "score") if layout["classifier"] else ("embed",)
            self.eps: float = layout["layer_norm_eps"]
            act_name, act_kwargs = _ACTIVATIONS[layout["hidden_act"]]
            self._act = functools.partial(getattr(F, act_name), **act_kwargs)
            self.dtype = dtype
            self.device = device

            h = self.hidden_size
            take = weights.pop
            self.word_embeddings = _param(take("embeddings.word_embeddings.weight"))
            pos = take("embeddings.position_embeddings.weight")
            types = take("embeddings.token_type_embeddings.weight", None)
            if types is None:
                types = torch.zeros(1, h, dtype=torch.float32)
            # position + token type 0 in one table, summed in float32 (the common no-token-type case)
            pos_type0 = (pos.float() + types[0].float()).to(pos.dtype)
            self.position_embeddings = _param(pos)
            self.token_type_embeddings = _param(types)
            self.register_buffer("position_type0", pos_type0, persistent=False)
            self.embed_ln_weight = _param(take("embeddings.LayerNorm.weight"))
            self.embed_ln_bias = _param(take("embeddings.LayerNorm.bias"))
            layers = []
            for n in range(self.num_layers):
                p = f"encoder.layer.{n}."
                qkv_w = torch.cat([take(p + f"attention.self.{x}.weight") for x in ("query", "key", "value")])
                qkv_b = torch.cat([take(p + f"attention.self.{x}.bias") for x in ("query", "key", "value")])
                layers.append(
                    EncoderLayer(
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
                self.head_dense_weight = _param(take(names[0] + ".weight"))
                self.head_dense_bias = _param(take(names[0] + ".bias"))
                self.head_out_weight = _param(take(names[1] + ".weight"))
                self.head_out_bias = _param(take(names[1] + ".bias"))
            else:
                self.head_dense_weight = self.head_dense_bias = self.head_out_weight = self.head_out_bias = None
            self.to(device)

        # ------------------------------------------------------------------ loading

        @classmethod
        def from_checkpoint(cls, model_dir: Path, hf_config: Any, dtype, device) -> "BertFamilyModel":
            layout = _layout(hf_config)
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
            device = torch.device(device)
            pooling = pooling_config_for(model_dir, default_pooling(layout))
            required, optional = expected_weights(layout)
            weights: dict[str, torch.Tensor] = {}
            for raw, tensor in iter_safetensors(model_dir):
                if _is_ignored(raw):
                    continue
                name = checkpoint_name(raw, layout)
                if name in weights:
                    raise CheckpointError(f"checkpoint {model_dir}: {raw!r} and another entry both map to {name!r}")
                weights[name] = tensor.to(dtype)
            check_names(model_dir, required, weights, optional)
            wrong = [
                f"{name} {tuple(weights[name].shape)} (expected {shape})"
                for name, shape in {**required, **optional}.items()
                if name in weights and tuple(weights[name].shape) != shape
            ]
            if wrong:
                raise CheckpointError(f"checkpoint {model_dir} does not match its config.json: wrong shapes: {wrong}")
            for name in optional:
                weights.pop(name, None)
            with torch.no_grad():
                return cls(layout, weights, pooling, dtype, device)

        def _apply(self, fn, recurse=True):
            out = super()._apply(fn, recurse)
            self._build_plan()
            return out

        def _build_plan(self) -> None:
            """Flat per-layer tuples of tensors for the forward loop (rebuilt after ``.to()``)."""
            if not hasattr(self, "layers"):
                return
            self.dtype = self.word_embeddings.dtype
            self.device = self.word_embeddings.device
            h = self.hidden_size
            self._plan = [
                (
                    PackedLinear(layer.qkv_weight, layer.qkv_bias),
                    PackedLinear(layer.o_weight, layer.o_bias),
                    layer.ln1_weight,
                    layer.ln1_bias,
                    PackedLinear(layer.up_weight, layer.up_bias),
                    PackedLinear(layer.down_weight, layer.down_bias),
                    layer.ln2_weight,
                    layer.ln2_bias,
                )
                for layer in self.layers
            ]
            # the last layer split for the "selected rows only" path: q of the rows, k/v of every token
            self._last_split = [
                (PackedLinear(layer.qkv_weight[:h], layer.qkv_bias[:h]),
                 PackedLinear(layer.qkv_weight[h:], layer.qkv_bias[h:]))
                for layer in self.layers[-1:]
            ]
            if self.head_out_weight is not None:
                self._head = (PackedLinear(self.head_dense_weight, self.head_dense_bias),
                              PackedLinear(self.head_out_weight, self.head_out_bias))

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
                mode = self.pooling.mode
                rows = pooled_rows(seq_lens, mode, input_ids.device)
                x = self._layers(x, plan, rows)
                return pool(x, seq_lens, self.pooling, rows_selected=rows is not None)
            if task in ("classify", "score"):
                if self.head_out_weight is None:
                    raise ValueError(f"{self.architecture} has no classification head: it runs task 'embed' only")
                x = self._layers(x, plan, pooled_rows(seq_lens, "cls", input_ids.device))
                dense, out_proj = self._head
                logits = out_proj(tanh(dense(x)))
                return logits if logits.dtype == torch.float32 else logits.float()
            raise ValueError(f"unknown task {task!r}; this model runs {self.tasks}")

        forward = forward_pool

        def extra_repr(self) -> str:
            return (
                f"arch={self.architecture}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"heads={self.num_heads}, vocab={self.vocab_size}, max_tokens={self.max_position_embeddings}, "
                f"labels={self.num_labels}, pooling={self.pooling.mode}"
                f"{'+normalize' if self.pooling.normalize else ''}, dtype={self.dtype}"
            )

    return BertFamilyModel


__all__ = [
    "ARCHITECTURES",
    "CLASSIFY_ARCHITECTURES",
    "EMBED_ARCHITECTURES",
    "checkpoint_name",
    "default_pooling",
    "expected_weights",
    "load",
    "register_model_families",
]
