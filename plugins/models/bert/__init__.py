"""The "bert" model family: BERT-style bidirectional encoders for embed / classify / score.

Covers ``BertModel``, ``RobertaModel`` and ``XLMRobertaModel`` (task
``embed``: pooled, optionally L2-normalised sentence embeddings, as the
model's sentence-transformers folder says) and their
``...ForSequenceClassification`` heads (tasks ``classify`` and ``score``:
cross-encoders). Each loads as a :class:`patchbay.model.PoolingModel`.

- :mod:`.layout` — config into layout, the weights a checkpoint must have (torch-free);
- :mod:`.attention` — bidirectional attention over a flat batch, planned per batch;
- :mod:`.model` — embeddings, encoder layers, classification heads, pooling.

Weights come straight from the checkpoint's safetensors (:mod:`patchbay.weights`),
with query/key/value fused into one projection. Importing the plugin is light
(no torch); torch is imported when a model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from patchbay import hookimpl
from patchbay.model import LoadRequest
from patchbay.registry import ModelFamily
from patchbay_plugins.models.bert.layout import ARCHITECTURES, CLASSIFY_ARCHITECTURES, EMBED_ARCHITECTURES


@hookimpl
def register_model_families(register):
    register(ModelFamily(name="bert", architectures=EMBED_ARCHITECTURES, tasks=frozenset({"embed"}), load=load))
    register(ModelFamily(name="bert", architectures=CLASSIFY_ARCHITECTURES,
                         tasks=frozenset({"classify", "score"}), load=load))


def load(request: LoadRequest):
    """The encoder of ``request.model_dir`` in ``request.dtype`` on ``request.device``
    (a :class:`~patchbay_plugins.models.bert.model.BertFamilyModel`)."""
    from patchbay_plugins.models.bert.model import BertFamilyModel

    return BertFamilyModel.from_checkpoint(Path(request.model_dir), request.hf_config, request.dtype, request.device)


__all__ = ["ARCHITECTURES", "CLASSIFY_ARCHITECTURES", "EMBED_ARCHITECTURES", "load", "register_model_families"]
