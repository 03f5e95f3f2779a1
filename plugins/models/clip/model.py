"""CLIP as a pooling model: a text input gives its text embedding, an image input its image embedding.

transformers' ``get_text_features`` / ``get_image_features`` (the pooled state through the
projection), L2-normalised as vLLM serves CLIP embeddings; scores are cosine similarities. An image
prompt reaches :meth:`ClipDualEncoder.pool` as a :class:`patchbay.model.MultimodalInputs` of one
item whose ``data`` is this family's processed pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patchbay.model import PoolingBatch, PoolingFacts
from patchbay.weights import frozen, load_checked
from patchbay_kernels.linear import PackedLinear
from patchbay_plugins.models.clip.layout import is_buffer, text_weights, tower_layout, vision_weights
from patchbay_plugins.models.clip.processor import ClipImageProcessor, read_preprocessor_config
from patchbay_plugins.models.clip.towers import TextTower, VisionTower


class ClipDualEncoder(nn.Module):
    """A :class:`patchbay.model.MultimodalPoolingModel`: CLIP's two towers and their projections."""

    def __init__(self, model_dir: Path, hf_config: Any, dtype: torch.dtype, device: torch.device):
        super().__init__()
        text, vision = tower_layout(hf_config.text_config), tower_layout(hf_config.vision_config)
        proj = int(hf_config.projection_dim)
        required = {**text_weights("text_model.", text), **vision_weights("vision_model.", vision),
                    "visual_projection.weight": (proj, vision["hidden_size"]),
                    "text_projection.weight": (proj, text["hidden_size"])}
        weights = load_checked(model_dir, required, {"logit_scale": ()}, dtype, skip=is_buffer)
        weights.pop("logit_scale", None)
        self.params = nn.ParameterDict({k.replace(".", "__"): frozen(v) for k, v in weights.items()})
        self.to(device)
        w = {k.replace("__", "."): p for k, p in self.params.items()}
        self.text = TextTower(w, "text_model.", text)
        self.vision = VisionTower(w, "vision_model.", vision)
        self.text_projection = PackedLinear(w["text_projection.weight"], small=False)
        self.visual_projection = PackedLinear(w["visual_projection.weight"], small=False)
        self.dtype, self.device = dtype, device
        self.vocab_size = text["vocab_size"]
        self.max_position_embeddings = text["max_position_embeddings"]
        self.num_parameters = sum(p.numel() for p in self.params.values())
        #: what one image becomes for the scheduler's budget: the tower's positions (class + patches)
        self.processor = ClipImageProcessor(read_preprocessor_config(model_dir), vision["num_positions"])
        self.pooling = PoolingFacts(tasks=("embed", "score"), embedding_size=proj, normalize=True, score_rule="cosine",
                                    max_input_tokens=self.max_position_embeddings)

    @torch.inference_mode()
    def text_features(self, prompts: list[list[int]]) -> torch.Tensor:
        """transformers' ``get_text_features`` of token-id prompts ``[B, projection_dim]`` (not normalised)."""
        return self.text_projection(self.text.pooled(prompts))

    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """transformers' ``get_image_features`` of ``[B, 3, S, S]`` pixels (not normalised)."""
        return self.visual_projection(self.vision.pooled(pixels.to(self.device, self.dtype)))

    def pool(self, batch: PoolingBatch) -> torch.Tensor:
        """Each prompt's normalised embedding, text prompts by the text tower, image prompts by the vision tower."""
        if batch.task != "embed":
            raise ValueError(f"CLIP embeds; it has no {batch.task!r} head")
        starts = [0]
        for n in batch.seq_lens:
            starts.append(starts[-1] + n)
        mm = batch.mm or [None] * len(batch.seq_lens)
        ids = batch.input_ids.tolist()
        text_rows = [i for i, m in enumerate(mm) if m is None]
        image_rows = [i for i, m in enumerate(mm) if m is not None]
        out = torch.empty(len(batch.seq_lens), self.pooling.embedding_size, dtype=torch.float32, device=self.device)
        if text_rows:
            prompts = [ids[starts[i] : starts[i + 1]] for i in text_rows]
            out[text_rows] = self.text_features(prompts).float()
        if image_rows:
            for i in image_rows:
                if len(mm[i].items) != 1:
                    raise ValueError("a CLIP image input holds exactly one image")
            pixels = torch.stack([mm[i].items[0].data for i in image_rows])
            out[image_rows] = self.image_features(pixels).float()
        return F.normalize(out, dim=-1)
