"""The "clip" model family: ``CLIPModel`` as a pooling model of text and images (a dual encoder).

A text input gives the text embedding, an image input the image embedding (transformers'
``get_text_features`` / ``get_image_features``, L2-normalised as vLLM serves them), so the
embeddings endpoints embed either and the score / rerank endpoints compare a text query with
image documents by cosine similarity. It loads as a :class:`patchbay.model.MultimodalPoolingModel`.

- :mod:`.layout` — configs into layouts, the weights a checkpoint must have (torch-free);
- :mod:`.towers` — the encoder layers, the vision and the text tower (the llava family reuses the
  vision tower);
- :mod:`.processor` — the folder's image preprocessing, in torch;
- :mod:`.model` — the dual encoder.

Importing the plugin is light (no torch); torch is imported when a model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from patchbay import hookimpl
from patchbay.model import LoadRequest
from patchbay.registry import ModelFamily

ARCHITECTURES = ("CLIPModel",)


@hookimpl
def register_model_families(register):
    register(ModelFamily(name="clip", architectures=ARCHITECTURES, tasks=frozenset({"embed"}), load=load))


def load(request: LoadRequest):
    """The dual encoder of ``request.model_dir`` (a :class:`~patchbay_plugins.models.clip.model.ClipDualEncoder`)."""
    from patchbay_plugins.models.clip.model import ClipDualEncoder

    return ClipDualEncoder(Path(request.model_dir), request.hf_config, request.dtype, request.device)


__all__ = ["ARCHITECTURES", "load", "register_model_families"]
