"""A transformers ``AutoModel`` encoder (or ``...ForSequenceClassification``) as a
:class:`patchbay.model.PoolingModel`.

The engine's encoder runner hands whole prompts, concatenated; they are padded
into one ``[B, L]`` batch with an attention mask and run through transformers'
own model and attention (no KV cache is kept for encoders). Embeddings are
pooled from the token states as the folder's sentence-transformers files say
(:mod:`patchbay_plugins.models.sentence_transformers`, as the native bert
family does), classifiers return their head's logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from patchbay.model import LoadRequest, PoolingBatch
from patchbay_plugins.models.fallback import support
from patchbay_plugins.models.sentence_transformers import PoolingConfig, pool, pooling_config_for, pooling_facts


def _input_limit(model_dir: Path, config: Any) -> int:
    """The longest input: the config's ``max_position_embeddings``, lowered to the tokenizer's
    ``model_max_length`` when that is smaller (models whose positions start after the padding id)."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    path = model_dir / "tokenizer_config.json"
    try:
        tok_max = json.loads(path.read_text()).get("model_max_length") if path.is_file() else None
    except (OSError, ValueError):
        tok_max = None
    if isinstance(tok_max, int) and 0 < tok_max and (not limit or tok_max < limit):
        limit = tok_max
    if not limit:
        raise ValueError(f"{model_dir}: neither the config nor the tokenizer says how long an input may be")
    return limit


class TransformersPoolingModel:
    """transformers' encoder plus the folder's pooling (or its classification head); see the module docstring."""

    def __init__(self, hf_model: Any, architecture: str, model_dir: Path, classifier: bool):
        config = hf_model.config
        self.hf_model = hf_model
        self.architecture = architecture
        self.classifier = classifier
        anchor = next(hf_model.parameters())
        self.dtype: torch.dtype = anchor.dtype
        self.device: torch.device = anchor.device
        self.vocab_size = int(config.vocab_size)
        self.max_position_embeddings = _input_limit(model_dir, config)
        self.num_parameters = sum(p.numel() for p in hf_model.parameters())
        decoder = getattr(config, "model_type", None) in support.causal_model_types()
        #: a decoder's classifier: its head reads the last token, found here (not by transformers' pad id)
        self.decoder_classifier = decoder and classifier
        default = PoolingConfig(mode="lasttoken", normalize=True) if decoder else PoolingConfig(mode="cls" if classifier
                                                                                                else "mean")
        self.pool_config = pooling_config_for(model_dir, default)
        labels: tuple[str, ...] = ()
        if classifier:
            id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
            labels = tuple(id2label.get(i, f"LABEL_{i}") for i in range(int(config.num_labels)))
        self.uses_token_type_ids = int(getattr(config, "type_vocab_size", 0) or 0) > 1
        self.pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self.pooling = pooling_facts(model_dir, config, self.pool_config,
                                     tasks=("classify", "score") if classifier else ("embed", "score"),
                                     embedding_size=0 if classifier else int(config.hidden_size), labels=labels,
                                     uses_token_type_ids=self.uses_token_type_ids)

    def pool(self, batch: PoolingBatch) -> torch.Tensor:
        """float32 ``[B, D]``: pooled embeddings, or the classification head's logits."""
        lens = list(batch.seq_lens)
        B, L, dev = len(lens), max(lens), self.device
        keep = torch.arange(L, device=dev).unsqueeze(0) < torch.tensor(lens, device=dev).unsqueeze(1)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=dev)
        ids[keep] = batch.input_ids.to(dev)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": keep.long()}
        if batch.token_type_ids is not None and self.uses_token_type_ids:
            types = torch.zeros((B, L), dtype=torch.long, device=dev)
            types[keep] = batch.token_type_ids.to(dev)
            kwargs["token_type_ids"] = types
        if batch.task != "embed" and self.decoder_classifier:
            return self._decoder_logits(ids, keep, lens)
        out = self.hf_model(**kwargs)
        if batch.task != "embed":
            if not self.classifier:
                raise ValueError(f"{self.architecture} has no classification head: it runs task 'embed' only")
            return out.logits.float()
        if self.classifier:
            raise ValueError(f"{self.architecture} is a classifier: it runs tasks {self.pooling.tasks}")
        return pool(out.last_hidden_state[keep], lens, self.pool_config)

    def _decoder_logits(self, ids: torch.Tensor, keep: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """A decoder classifier's logits at each prompt's last token. transformers finds that token as the last
        one that is not ``pad_token_id`` — it refuses a batch when the config names none, and misreads a prompt
        that ends in that id — so the base model runs here and its ``score`` head reads the known last token
        (a model without such a head runs one prompt at a time)."""
        head = getattr(self.hf_model, "score", None)
        if not isinstance(head, torch.nn.Linear):
            return torch.cat([self.hf_model(input_ids=ids[i:i + 1, :n]).logits for i, n in enumerate(lens)]).float()
        states = self.hf_model.base_model(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        last = torch.tensor(lens, device=ids.device) - 1
        return head(states[torch.arange(len(lens), device=ids.device), last]).float()

    def __repr__(self) -> str:
        return (f"TransformersPoolingModel({self.architecture}, pooling={self.pool_config.mode}"
                f"{'+normalize' if self.pool_config.normalize else ''}, dtype={self.dtype})")


def load_pooling(request: LoadRequest) -> TransformersPoolingModel:
    """transformers' encoder (task embed) or sequence classifier (classify / score) of ``request.model_dir``,
    refused at start-up unless it runs on text alone (one short input through :meth:`~TransformersPoolingModel.pool`)."""
    archs = list(getattr(request.hf_config, "architectures", None) or [])
    arch, cls = support.model_class(archs, request.task)
    hf_model = support.from_folder(cls, Path(request.model_dir), request.dtype, request.device)
    try:
        model = TransformersPoolingModel(hf_model, arch, Path(request.model_dir), classifier=request.task != "embed")
        with torch.inference_mode():
            model.pool(PoolingBatch(torch.tensor([1, 2, 3]), [3], None, request.task if request.task == "embed"
                                    else "classify"))
    except (AttributeError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ValueError(f"{arch}: transformers' {cls.__name__} does not run on text alone, so the transformers "
                         f"fallback cannot serve it for {request.task!r} ({type(exc).__name__}: {exc})") from exc
    return model
