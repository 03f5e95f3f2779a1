"""The "llava" model family: ``LlavaForConditionalGeneration`` — a CLIP vision tower, a projector, and a
llama-style language model.

Each image becomes the projected hidden states of the vision tower at ``vision_feature_layer`` (the class
token dropped under the ``default`` select strategy), one per placeholder token; the runner places them
at the prompt's placeholder positions and the decoder — the llama family's own, unchanged — runs on the
shared scheduler like any generative model. Preprocessing is the folder's own CLIP image processor
(``preprocessor_config.json``), computed in torch (:mod:`patchbay_plugins.models.clip.processor`).

Checkpoints in transformers 5's layout (``model.language_model.*``, ``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``lm_head``) and in the older one (``language_model.model.*``,
``language_model.lm_head``, ``vision_tower.*``, ``multi_modal_projector.*``) both load.
Importing the plugin is light (no torch).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from patchbay import hookimpl
from patchbay.model import LoadRequest
from patchbay.registry import ModelFamily

ARCHITECTURES = ("LlavaForConditionalGeneration",)
#: stored name prefix -> the family's (older layouts first; the language model takes the llama family's names)
_RENAMES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh")


@hookimpl
def register_model_families(register):
    register(ModelFamily(name="llava", architectures=ARCHITECTURES, tasks=frozenset({"generate"}), load=load))


def load(request: LoadRequest):
    """The Llava model of ``request.model_dir`` (a :class:`patchbay.model.MultimodalModel`)."""
    return _model_class().from_checkpoint(Path(request.model_dir), request.hf_config, request.dtype, request.device)


def checkpoint_name(name: str) -> str:
    """The family's name of a stored weight (the vision tower's without CLIP's ``vision_model.`` level)."""
    for old, new in _RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    return "vision_tower." + name[len("vision_tower.vision_model."):] if name.startswith(
        "vision_tower.vision_model.") else name


def image_token(model_dir: Path) -> str:
    """The text of one image in prompts: the processor config's ``image_token``, else ``<image>``."""
    path = model_dir / "processor_config.json"
    if path.is_file():
        token = json.loads(path.read_text()).get("image_token")
        if isinstance(token, str) and token:
            return token
    return "<image>"


@functools.lru_cache(maxsize=None)
def _model_class():
    """The model class; defined on first use so that importing the plugin does not import torch."""
    import torch
    from torch import nn

    from patchbay_kernels.linear import PackedLinear
    from patchbay.weights import frozen, load_checked
    from patchbay_plugins.models import llama
    from patchbay_plugins.models.clip.layout import is_buffer, tower_layout, vision_weights
    from patchbay_plugins.models.clip.processor import ClipImageProcessor, read_preprocessor_config
    from patchbay_plugins.models.clip.towers import VisionTower, activation

    class LlavaModel(nn.Module):
        """Vision tower + projector + the llama family's decoder (see the module docstring)."""

        def __init__(self, model_dir: Path, cfg: Any, dtype: torch.dtype, device: torch.device):
            super().__init__()
            feature_layer = cfg.vision_feature_layer
            if not isinstance(feature_layer, int):
                raise ValueError("llava family: a list of vision_feature_layer values is not supported")
            if cfg.vision_feature_select_strategy not in ("default", "full"):
                raise ValueError(f"llava family: vision_feature_select_strategy "
                                 f"{cfg.vision_feature_select_strategy!r} is not supported")
            if cfg.projector_hidden_act not in _ACTIVATIONS:
                raise ValueError(f"llava family: projector_hidden_act {cfg.projector_hidden_act!r} is not supported")
            text_cfg = cfg.text_config
            text = llama._layout(text_cfg)
            vision = tower_layout(cfg.vision_config)
            vh, h = vision["hidden_size"], text["hidden_size"]
            bias = bool(getattr(cfg, "multimodal_projector_bias", True))
            projector = {"multi_modal_projector.linear_1.weight": (h, vh), "multi_modal_projector.linear_2.weight": (h, h)}
            if bias:
                projector.update({"multi_modal_projector.linear_1.bias": (h,),
                                  "multi_modal_projector.linear_2.bias": (h,)})
            lm_required, lm_optional = llama.expected_weights(text)
            required = {**lm_required, **vision_weights("vision_tower.", vision, post_layernorm=False),
                        **projector}
            post = {f"vision_tower.post_layernorm.{x}": (vh,) for x in ("weight", "bias")}
            weights = load_checked(model_dir, required, {**lm_optional, **post}, dtype, rename=checkpoint_name,
                                   skip=lambda n: is_buffer(n) or n.endswith("rotary_emb.inv_freq"))
            inv_freq, scaling = llama.rope_inv_freq(text_cfg, text["head_dim"])
            lm_weights = {k: weights.pop(k) for k in list(weights) if k.startswith("model.") or k == "lm_head.weight"}
            with torch.no_grad():
                self.language_model = llama._model_class()(text, lm_weights, inv_freq, scaling, dtype, device)
            for name in post:
                weights.pop(name, None)
            self.vision_params = nn.ParameterDict({k.replace(".", "__"): frozen(v.to(device))
                                                   for k, v in weights.items()})
            w = {k.replace("__", "."): p for k, p in self.vision_params.items()}
            self.vision = VisionTower(w, "vision_tower.", vision)
            p = "multi_modal_projector."
            self.linear_1 = PackedLinear(w[p + "linear_1.weight"], w.get(p + "linear_1.bias"))
            self.linear_2 = PackedLinear(w[p + "linear_2.weight"], w.get(p + "linear_2.bias"))
            self.projector_act = activation(cfg.projector_hidden_act)
            self.feature_layer = feature_layer
            self.drop_cls = cfg.vision_feature_select_strategy == "default"

            lm = self.language_model
            self.dtype, self.device = dtype, device
            self.vocab_size, self.max_position_embeddings = lm.vocab_size, lm.max_position_embeddings
            self.sliding_window, self.kv_layout = lm.sliding_window, lm.kv_layout
            self.num_parameters = lm.num_parameters + sum(t.numel() for t in self.vision_params.values())
            self.placeholder_token_id = int(cfg.image_token_id)
            self.image_token = image_token(model_dir)
            settings = read_preprocessor_config(model_dir)
            crop = settings.get("crop_size") or {}
            size = vision["image_size"]
            if isinstance(crop, dict) and crop and (crop.get("height"), crop.get("width")) != (size, size):
                raise ValueError(f"llava family: the image processor crops to {crop}, the vision tower takes "
                                 f"{size}x{size}")
            num = (size // vision["patch_size"]) ** 2 + (0 if self.drop_cls else 1)
            self.processor = ClipImageProcessor(settings, num)

        @classmethod
        def from_checkpoint(cls, model_dir: Path, hf_config: Any, dtype, device) -> "LlavaModel":
            return cls(model_dir, hf_config, dtype, device)

        # ------------------------------------------------------------------ the contract

        @torch.inference_mode()
        def embed_items(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
            """Each image's projected features ``[num_placeholders, hidden]``, one vision forward for all."""
            pixels = torch.stack(list(items)).to(self.device, self.dtype)
            states = self.vision.hidden_states(pixels, self.feature_layer)
            if self.drop_cls:
                states = states[:, 1:]
            feats = self.linear_2(self.projector_act(self.linear_1(states.contiguous())))
            return list(feats.unbind(0))

        def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.language_model.embed_input_ids(input_ids)

        def forward_embeds(self, inputs_embeds, positions, kv_caches, meta) -> torch.Tensor:
            return self.language_model.forward_embeds(inputs_embeds, positions, kv_caches, meta)

        def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
            return self.language_model.forward(input_ids, positions, kv_caches, meta)

        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            return self.language_model.compute_logits(hidden)

    return LlavaModel


__all__ = ["ARCHITECTURES", "checkpoint_name", "image_token", "load", "register_model_families"]
