"""The bert family's reading of a checkpoint: config into layout, expected weights, weight names.

Torch-free (the plugin's import stays light).
"""

from __future__ import annotations

from typing import Any

EMBED_ARCHITECTURES = ("BertModel", "RobertaModel", "XLMRobertaModel")
CLASSIFY_ARCHITECTURES = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
)
ARCHITECTURES = EMBED_ARCHITECTURES + CLASSIFY_ARCHITECTURES
_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
#: hidden_act -> (torch.nn.functional name, kwargs); the tanh GELUs are one formula in three spellings
ACTIVATIONS = {
    "gelu": ("gelu", {}),
    "gelu_new": ("gelu", {"approximate": "tanh"}),
    "gelu_fast": ("gelu", {"approximate": "tanh"}),
    "gelu_pytorch_tanh": ("gelu", {"approximate": "tanh"}),
    "relu": ("relu", {}),
    "silu": ("silu", {}),
    "swish": ("silu", {}),
}




def read_layout(cfg: Any) -> dict[str, Any]:
    """Everything the weights and the forward need to know about ``cfg``."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"bert family: unsupported model_type {model_type!r} (supported: {_MODEL_TYPES})")
    archs = list(getattr(cfg, "architectures", None) or [])
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"bert family: unsupported architectures {archs} (supported: {ARCHITECTURES})")
    act = getattr(cfg, "hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"bert family: unsupported hidden_act {act!r} (supported: {sorted(ACTIVATIONS)})")
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


def is_ignored(name: str) -> bool:
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
