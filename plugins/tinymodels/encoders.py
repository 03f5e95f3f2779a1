"""Tiny BERT / RoBERTa / XLM-R encoders and cross-encoders with random weights, optionally as
sentence-transformers folders (:func:`write_sentence_transformers_files`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from patchbay_plugins.models.sentence_transformers import LEGACY_POOLING_KEYS, MODULES_FILE, PoolingConfig

from .tokenizers import BERT_SPECIAL_TOKENS, ROBERTA_SPECIAL_TOKENS, save_encoder_tokenizer
from .weights import prepare_folder, size_config, write_config_and_weights
from .zoo import FALLBACK_ENCODERS, fallback_config

#: encoder architecture -> (transformers config class name, model_type family of the tokenizer)
ENCODER_ARCHITECTURES = {
    "BertModel": ("BertConfig", "bert"),
    "BertForSequenceClassification": ("BertConfig", "bert"),
    "RobertaModel": ("RobertaConfig", "roberta"),
    "RobertaForSequenceClassification": ("RobertaConfig", "roberta"),
    "XLMRobertaModel": ("XLMRobertaConfig", "roberta"),
    "XLMRobertaForSequenceClassification": ("XLMRobertaConfig", "roberta"),
}


def build_tiny_encoder(
    directory: str | os.PathLike,
    arch: str = "BertModel",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int | None = None,
    num_labels: int = 1,
    sentence_transformers: bool | str = False,
    normalize: bool = True,
    max_seq_length: int | None = None,
    st_legacy_keys: bool = True,
    dtype: str = "float32",
    seed: int = 0,
    shards: int = 1,
    **config_overrides: Any,
) -> Path:
    """Write a complete HF folder of a tiny random BERT / RoBERTa / XLM-R encoder; return its path.

    ``arch`` is one of :data:`ENCODER_ARCHITECTURES` (bare encoders and
    ``...ForSequenceClassification`` cross-encoders with ``num_labels``).
    BERT gets a lower-casing WordPiece tokenizer (``[PAD]`` 0, ``[UNK]``,
    ``[CLS]``, ``[SEP]``, ``[MASK]``; pairs get token_type_ids 1), RoBERTa and
    XLM-R a byte-level BPE tokenizer with RoBERTa's post-processor (``<s>`` 0,
    ``<pad>`` 1 = ``padding_idx``, ``</s>`` 2). ``max_position_embeddings`` is
    the config's value (default 512 for BERT, 514 for RoBERTa / XLM-R, whose
    positions start at ``padding_idx + 1``).

    ``sentence_transformers``: ``False``, or a pooling mode (``"mean"``,
    ``"cls"``, ``"lasttoken"``, ``"max"``, ...; ``True`` means ``"mean"``) to
    also write a sentence-transformers folder (``modules.json``,
    ``1_Pooling/config.json``, ``2_Normalize`` when ``normalize``,
    ``sentence_bert_config.json`` with ``max_seq_length``).
    ``config_overrides`` go to the transformers config class as they are
    (e.g. ``hidden_act``, ``layer_norm_eps``, ``id2label``).

    ``arch`` may also be one of
    :data:`~patchbay_plugins.tinymodels.zoo.FALLBACK_ENCODERS` (encoders only
    the transformers fallback serves), built with the BERT tokenizer.
    """
    arch_values: dict[str, Any] = {}
    if arch in ENCODER_ARCHITECTURES:
        config_name, family = ENCODER_ARCHITECTURES[arch]
    elif arch in FALLBACK_ENCODERS:
        (config_name, arch_values), family = fallback_config(arch), "bert"
    else:
        raise ValueError(f"unknown encoder arch {arch!r}; known: {sorted(ENCODER_ARCHITECTURES)} and "
                         f"{sorted(FALLBACK_ENCODERS)}")
    directory, torch_dtype = prepare_folder(directory, dtype)

    if family == "bert":
        pad_id = BERT_SPECIAL_TOKENS.index("[PAD]")
        max_pos = max_position_embeddings or 512
        usable = max_pos
        kwargs: dict[str, Any] = dict(pad_token_id=pad_id, type_vocab_size=2, layer_norm_eps=1e-12)
    else:
        pad_id = ROBERTA_SPECIAL_TOKENS.index("<pad>")
        max_pos = max_position_embeddings or 514
        usable = max_pos - pad_id - 1
        kwargs = dict(
            pad_token_id=pad_id,
            bos_token_id=ROBERTA_SPECIAL_TOKENS.index("<s>"),
            eos_token_id=ROBERTA_SPECIAL_TOKENS.index("</s>"),
            type_vocab_size=1,
            layer_norm_eps=1e-5,
        )
    kwargs.update(
        size_config(
            vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            intermediate_size=intermediate_size, max_position_embeddings=max_pos,
        ),
        hidden_act="gelu",
    )
    if arch.endswith("ForSequenceClassification"):
        kwargs["num_labels"] = num_labels
    kwargs.update(arch_values)
    kwargs.update(config_overrides)
    write_config_and_weights(directory, arch, config_name, kwargs, dtype=torch_dtype, seed=seed, shards=shards)
    save_encoder_tokenizer(directory, family, vocab_size, usable)
    if sentence_transformers:
        mode = "mean" if sentence_transformers is True else str(sentence_transformers)
        write_sentence_transformers_files(
            directory, hidden_size, mode, normalize=normalize, max_seq_length=max_seq_length, legacy_keys=st_legacy_keys
        )
    return directory


def write_sentence_transformers_files(
    model_dir: str | Path,
    embedding_dimension: int,
    mode: str = "mean",
    *,
    normalize: bool = True,
    max_seq_length: int | None = None,
    do_lower_case: bool = False,
    legacy_keys: bool = True,
) -> Path:
    """Turn the HF folder ``model_dir`` into an ST folder (Transformer -> Pooling [-> Normalize]),
    as :func:`patchbay_plugins.models.sentence_transformers.read_pooling_config` reads it.

    ``legacy_keys`` writes the ``pooling_mode_*`` booleans that ST < 5 wrote
    (and that most published models carry); else ST 5's ``pooling_mode``.
    """
    model_dir = Path(model_dir)
    PoolingConfig(mode=mode)  # raises ValueError on an unknown mode
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (model_dir / "2_Normalize").mkdir(exist_ok=True)
    (model_dir / MODULES_FILE).write_text(json.dumps(modules, indent=2) + "\n")
    pooling: dict[str, Any] = {"word_embedding_dimension": embedding_dimension}
    if legacy_keys:
        pooling.update({key: key_mode == mode for key, key_mode in LEGACY_POOLING_KEYS.items()})
    else:
        pooling.update({"pooling_mode": mode, "include_prompt": True})
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    (model_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": do_lower_case}, indent=2) + "\n"
    )
    (model_dir / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2) + "\n"
    )
    return model_dir
