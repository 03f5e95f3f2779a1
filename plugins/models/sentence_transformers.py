"""Sentence-transformers folders: how a model's token states become one embedding.

A sentence-transformers (ST) model folder is an HF model folder plus a few
small files that say what to do after the transformer::

    modules.json                 [Transformer (path ""), Pooling ("1_Pooling"), Normalize ("2_Normalize")]
    1_Pooling/config.json        the pooling mode, as pooling_mode_* booleans (ST < 5) or "pooling_mode"
    sentence_bert_config.json    max_seq_length, do_lower_case

:func:`read_pooling_config` turns them into a :class:`PoolingConfig`;
:func:`pool` applies one to the final hidden states of a flat
variable-length batch. Nothing here knows about any architecture, so any
family (BERT-style encoders, a decoder used as an embedder) can use both.

Import is light (no torch); :func:`pool` imports torch when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from patchbay.weights import CheckpointError

if TYPE_CHECKING:
    import torch

MODULES_FILE = "modules.json"
#: ST reads the first of these that exists (the Transformer module's config).
ST_CONFIG_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)

#: Pooling modes, spelled as ST >= 5 spells them in ``pooling_mode``.
POOLING_MODES = ("cls", "mean", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean")
#: ST's legacy boolean keys (``1_Pooling/config.json`` of ST < 5) -> mode.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: Module classes (last dotted name of a modules.json ``type``) and what we do with them.
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"


def _check_mode(mode: str) -> str:
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; known: {POOLING_MODES}")
    return mode


@attrs.frozen
class PoolingConfig:
    """How token states become one embedding per sequence.

    ``mode``: one of :data:`POOLING_MODES`; ``normalize``: L2-normalise the
    pooled vector (ST's ``Normalize`` module); ``max_seq_length``: ST's
    truncation length (``None``: the model's own limit); ``do_lower_case``:
    ST lower-cases the text before tokenizing; ``include_prompt``: ST's
    Pooling option (``False``: prompt tokens are left out of the pooling);
    ``source``: ``"sentence-transformers"`` when read from an ST folder, else
    ``"default"``.
    """

    mode: str = attrs.field(default="mean", validator=lambda _i, _a, v: _check_mode(v))
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    include_prompt: bool = True
    source: str = "default"

    @property
    def needs_all_tokens(self) -> bool:
        """Whether pooling reads every token's state (``False`` for cls / lasttoken)."""
        return self.mode not in ("cls", "lasttoken")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc


def pooling_mode_from_config(cfg: dict[str, Any], where: str = "1_Pooling/config.json") -> str:
    """The single pooling mode of an ST Pooling config (either spelling)."""
    mode = cfg.get("pooling_mode")
    if mode is not None:
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [m for key, m in LEGACY_POOLING_KEYS.items() if cfg.get(key, False)]
        if not modes:  # ST's own default when no key is set
            modes = ["mean"]
    if len(modes) != 1:
        raise CheckpointError(f"{where}: combined pooling modes {modes} are not supported (one mode only)")
    if modes[0] not in POOLING_MODES:
        raise CheckpointError(f"{where}: unknown pooling mode {modes[0]!r}; known: {POOLING_MODES}")
    return modes[0]


def is_sentence_transformers_folder(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MODULES_FILE).is_file()


def read_pooling_config(model_dir: str | Path) -> PoolingConfig | None:
    """The :class:`PoolingConfig` of the ST folder ``model_dir``, or ``None`` if it has no ``modules.json``.

    Supported pipelines are ``Transformer`` (at the folder's root), then
    optionally ``Pooling``, then optionally ``Normalize``. Any other module
    (``Dense``, ``LayerNorm``, a ``Router``, ...) changes the embedding in a
    way we do not reproduce, so it raises :class:`CheckpointError` naming it.
    """
    model_dir = Path(model_dir)
    modules_path = model_dir / MODULES_FILE
    if not modules_path.is_file():
        return None
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise CheckpointError(f"{modules_path}: expected a list of {{'type', 'path', ...}} objects")
    modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]

    order = [_TRANSFORMER, _POOLING, _NORMALIZE]
    pos = 0
    for kind, module in zip(kinds, modules):
        if kind not in order[pos:]:
            supported = " -> ".join(order)
            raise CheckpointError(
                f"{modules_path}: module {module['type']!r} (at {module.get('path', '')!r}) is not supported; "
                f"supported pipelines are {supported} (Pooling and Normalize optional)"
            )
        pos = order.index(kind) + 1
    if not kinds or kinds[0] != _TRANSFORMER:
        raise CheckpointError(f"{modules_path}: the first module must be a Transformer, got {kinds}")
    tr_path = str(modules[0].get("path", "") or "")
    if tr_path not in ("", "."):
        raise CheckpointError(
            f"{modules_path}: the Transformer lives in the subfolder {tr_path!r}; only ST folders whose "
            "transformer is at the folder's root are supported"
        )

    if _POOLING not in kinds:
        raise CheckpointError(
            f"{modules_path}: no Pooling module; token-level (multi-vector) outputs are not supported"
        )
    sub = modules[kinds.index(_POOLING)].get("path", "") or ""
    pool_path = model_dir / sub / "config.json"
    if not pool_path.is_file():
        raise CheckpointError(f"{modules_path} names a Pooling module, but {pool_path} does not exist")
    pool_cfg = _read_json(pool_path)
    mode = pooling_mode_from_config(pool_cfg, str(pool_path))
    include_prompt = bool(pool_cfg.get("include_prompt", True))

    max_seq_length, do_lower_case = None, False
    for name in ST_CONFIG_FILES:
        path = model_dir / name
        if path.is_file():
            st_cfg = _read_json(path)
            if st_cfg.get("max_seq_length") is not None:
                max_seq_length = int(st_cfg["max_seq_length"])
            do_lower_case = bool(st_cfg.get("do_lower_case", False))
            break
    return PoolingConfig(
        mode=mode,
        normalize=_NORMALIZE in kinds,
        max_seq_length=max_seq_length,
        do_lower_case=do_lower_case,
        include_prompt=include_prompt,
        source="sentence-transformers",
    )


def pooling_config_for(model_dir: str | Path, default: PoolingConfig | None = None) -> PoolingConfig:
    """The ST folder's pooling, else ``default`` (else mean pooling without normalisation)."""
    found = read_pooling_config(model_dir)
    if found is not None:
        return found
    return default if default is not None else PoolingConfig()


# --------------------------------------------------------------------------- pooling (torch)


def segment_ids(seq_lens: list[int], device: Any = None) -> torch.Tensor:
    """``[0]*seq_lens[0] + [1]*seq_lens[1] + ...`` as a LongTensor."""
    import torch

    lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens)


def pooled_rows(seq_lens: list[int], mode: str, device: Any = None) -> torch.Tensor | None:
    """Rows of the flat batch that ``mode`` reads (first / last token of each sequence), or ``None`` for all.

    A model may compute its last layer for these rows only and hand them to
    :func:`pool` with ``rows_selected=True``.
    """
    import torch

    if mode not in ("cls", "lasttoken"):
        return None
    lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
    ends = torch.cumsum(lens, 0)
    return ends - lens if mode == "cls" else ends - 1


def pool(
    hidden: torch.Tensor, seq_lens: list[int], config: PoolingConfig, *, rows_selected: bool = False
) -> torch.Tensor:
    """One float32 vector per sequence of the flat batch ``hidden`` ``[T, H]`` (``T == sum(seq_lens)``).

    Matches sentence-transformers' Pooling (+ Normalize) on the same token
    states. ``rows_selected``: ``hidden`` is already the ``[B, H]`` rows of
    :func:`pooled_rows` (cls / lasttoken only).
    """
    import torch
    import torch.nn.functional as F

    B = len(seq_lens)
    mode = config.mode
    x = hidden if hidden.dtype == torch.float32 else hidden.float()
    if rows_selected:
        if config.needs_all_tokens:
            raise ValueError(f"pooling mode {mode!r} reads every token; rows_selected is for cls / lasttoken")
        if x.shape[0] != B:
            raise ValueError(f"rows_selected: expected {B} rows, got {x.shape[0]}")
        out = x
    elif any(n <= 0 for n in seq_lens):
        raise ValueError(f"every sequence needs at least one token, got lengths {seq_lens}")
    elif x.shape[0] != sum(seq_lens):
        raise ValueError(f"hidden has {x.shape[0]} rows, seq_lens sum to {sum(seq_lens)}")
    elif mode in ("cls", "lasttoken"):
        out = x.index_select(0, pooled_rows(seq_lens, mode, x.device))
    elif mode in ("mean", "mean_sqrt_len_tokens"):
        lens = torch.tensor(seq_lens, dtype=torch.float32, device=x.device).unsqueeze(1)
        if B == 1:
            sums = x.sum(0, keepdim=True)
        else:
            sums = x.new_zeros(B, x.shape[1]).index_add_(0, segment_ids(seq_lens, x.device), x)
        out = sums / (lens if mode == "mean" else lens.sqrt())
    elif mode == "max":
        if B == 1:
            out = x.amax(0, keepdim=True)
        else:
            seg = segment_ids(seq_lens, x.device).unsqueeze(1).expand_as(x)
            out = x.new_full((B, x.shape[1]), float("-inf")).scatter_reduce_(0, seg, x, reduce="amax")
    elif mode == "weightedmean":
        lens = torch.tensor(seq_lens, dtype=torch.long, device=x.device)
        starts = torch.cumsum(lens, 0) - lens
        seg = segment_ids(seq_lens, x.device)
        w = (torch.arange(x.shape[0], device=x.device) - starts.index_select(0, seg) + 1).to(torch.float32)
        sums = x.new_zeros(B, x.shape[1]).index_add_(0, seg, x * w.unsqueeze(1))
        wsum = x.new_zeros(B).index_add_(0, seg, w).unsqueeze(1)
        out = sums / wsum
    else:  # unreachable: PoolingConfig validates the mode
        raise ValueError(f"unknown pooling mode {mode!r}")
    if config.normalize:
        out = F.normalize(out, p=2.0, dim=-1)
    return out


# --------------------------------------------------------------------------- the facts a family declares


#: sentence-transformers' CrossEncoder activations -> the score activation they mean
_SCORE_ACTIVATIONS = {"identity": "identity", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "identity"}


def _named_prompts(model_dir: Path, hf_config: Any) -> dict[str, str]:
    """Prompt prefixes by name: the HF config's ``task_instructions``, else sentence-transformers' ``prompts``."""
    ti = getattr(hf_config, "task_instructions", None)
    if isinstance(ti, dict) and ti:
        return {k: v for k, v in ti.items() if isinstance(v, str)}
    path = Path(model_dir) / "config_sentence_transformers.json"
    try:
        found = json.loads(path.read_text()).get("prompts") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        found = None
    return {k: v for k, v in found.items() if isinstance(v, str)} if isinstance(found, dict) else {}


def pooling_facts(model_dir: str | Path, hf_config: Any, config: PoolingConfig, *, tasks: tuple[str, ...],
                  embedding_size: int = 0, labels: tuple[str, ...] = (),
                  uses_token_type_ids: bool = False) -> Any:
    """The :class:`patchbay.model.PoolingFacts` of a pooling model from its folder: ``config`` (its
    sentence-transformers pooling), the HF config's Matryoshka marks (``matryoshka_dimensions`` /
    ``is_matryoshka``, as vLLM reads them), ``problem_type``, the cross-encoder activation
    (``sentence_transformers.activation_fn``) and named prompts."""
    from patchbay.model import PoolingFacts

    dims = getattr(hf_config, "matryoshka_dimensions", None)
    dims = tuple(int(d) for d in dims) if dims else None
    multi = getattr(hf_config, "problem_type", None) == "multi_label_classification"
    st = getattr(hf_config, "sentence_transformers", None)
    act = st.get("activation_fn") if isinstance(st, dict) else None
    act = act.rsplit(".", 1)[-1].lower() if isinstance(act, str) else ""
    return PoolingFacts(
        tasks=tasks,
        embedding_size=embedding_size,
        normalize=config.normalize,
        matryoshka=bool(dims) or bool(getattr(hf_config, "is_matryoshka", False)),
        matryoshka_dimensions=dims,
        labels=labels,
        classify_activation="sigmoid" if len(labels) == 1 or multi else "softmax",
        score_rule="cross-encoder" if "classify" in tasks else "cosine",
        score_activation=_SCORE_ACTIVATIONS.get(act, "sigmoid"),
        max_input_tokens=config.max_seq_length,
        lower_case=config.do_lower_case,
        uses_token_type_ids=uses_token_type_ids,
        prompts=_named_prompts(Path(model_dir), hf_config),
    )


def decoder_pooling_facts(model_dir: str | Path, hf_config: Any, embedding_size: int) -> Any:
    """The :class:`patchbay.model.PoolingFacts` of a causal decoder served as an embedder (``--convert embed``):
    last-token pooling, L2-normalised unless its sentence-transformers folder says otherwise (a decoder's last
    state is the only one that saw the whole prompt, so any other pooling mode is refused)."""
    config = pooling_config_for(model_dir, PoolingConfig(mode="lasttoken", normalize=True))
    if config.mode != "lasttoken":
        raise CheckpointError(f"{model_dir}: a decoder embeds with last-token pooling, not {config.mode!r}")
    return pooling_facts(model_dir, hf_config, config, tasks=("embed", "score"), embedding_size=embedding_size)


__all__ = [
    "decoder_pooling_facts",
    "pooling_facts",
    "LEGACY_POOLING_KEYS",
    "POOLING_MODES",
    "PoolingConfig",
    "is_sentence_transformers_folder",
    "pool",
    "pooling_config_for",
    "pooled_rows",
    "pooling_mode_from_config",
    "read_pooling_config",
    "segment_ids",
]
