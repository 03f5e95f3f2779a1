"""CLIP's image preprocessing in torch, read from the folder's own ``preprocessor_config.json``.

The steps of transformers' ``CLIPImageProcessor``: RGB (transparency composited onto white),
resize so the shortest edge has ``size["shortest_edge"]`` pixels (bicubic, antialiased, in
Pillow's two 8-bit passes), center crop to ``crop_size`` (zero padding where the image is
smaller), rescale (``rescale_factor``), normalise (``image_mean`` / ``image_std``). The result
equals transformers' within float tolerance (see tests/test_vision_models.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

#: Pillow resample codes this processor implements, and torch's mode for each
_RESAMPLE = {3: "bicubic", 2: "bilinear"}


def read_preprocessor_config(model_dir: Path) -> dict[str, Any]:
    """``preprocessor_config.json``, else the ``image_processor`` of ``processor_config.json``."""
    path = model_dir / "preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    path = model_dir / "processor_config.json"
    if path.is_file():
        nested = json.loads(path.read_text()).get("image_processor")
        if isinstance(nested, dict):
            return nested
    raise ValueError(f"{model_dir}: no preprocessor_config.json (the image processor's settings)")


def to_rgb(image: Any) -> Any:
    """A Pillow image in RGB, transparency composited onto white (as transformers' ``convert_to_rgb``)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


class ClipImageProcessor:
    """One decoded image -> ``[3, H, W]`` float32 pixels, the family's ``ImageProcessor``."""

    def __init__(self, config: dict[str, Any], num_placeholders: int):
        if config.get("do_resize", True):
            size = config.get("size") or {}
            if isinstance(size, int):
                size = {"shortest_edge": size}
            if "shortest_edge" not in size and not ("height" in size and "width" in size):
                raise ValueError(f"image processor size {size!r}: expected shortest_edge, or height and width")
            self.size: dict[str, int] | None = size
        else:
            self.size = None
        resample = int(config.get("resample", 3))
        if resample not in _RESAMPLE:
            raise ValueError(f"image processor resample {resample}: supported are {sorted(_RESAMPLE)}")
        self.mode = _RESAMPLE[resample]
        crop = config.get("crop_size") or {}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        self.crop = (int(crop["height"]), int(crop["width"])) if config.get("do_center_crop", True) else None
        self.rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
        self.normalize = config.get("do_normalize", True)
        self.mean = torch.tensor(config.get("image_mean", [0.5] * 3), dtype=torch.float64).view(-1, 1, 1)
        self.std = torch.tensor(config.get("image_std", [0.5] * 3), dtype=torch.float64).view(-1, 1, 1)
        self.convert_rgb = config.get("do_convert_rgb", True)
        self._num_placeholders = num_placeholders

    def _target(self, height: int, width: int) -> tuple[int, int]:
        if self.size is None:
            return height, width
        if "shortest_edge" in self.size:
            edge = int(self.size["shortest_edge"])
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(edge * long / short)
            return (new_long, edge) if width <= height else (edge, new_long)
        return int(self.size["height"]), int(self.size["width"])

    def __call__(self, image: Any) -> torch.Tensor:
        if self.convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"image mode {image.mode}: this processor does not convert to RGB")
        width, height = image.size
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)
        new_h, new_w = self._target(height, width)
        x = x.to(torch.float32)
        # Pillow resamples 8-bit images in two passes, width then height, back to 8 bits after each
        for size in ((height, new_w), (new_h, new_w)):
            if size != tuple(x.shape[1:]):
                x = F.interpolate(x[None], size=size, mode=self.mode, align_corners=False, antialias=True)[0]
                x = x.round_().clamp_(0, 255)
        x = x.to(torch.float64)
        if self.crop is not None:
            x = center_crop(x, *self.crop)
        if self.rescale is not None:
            x = x * self.rescale
        if self.normalize:
            x = (x - self.mean) / self.std
        return x.to(torch.float32).contiguous()

    def num_placeholders(self, processed: Any) -> int:
        """Embeddings (placeholder tokens) one image becomes: fixed by the tower's size."""
        return self._num_placeholders


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' center crop of ``[C, H, W]``, zero-padding (centred) where the image is smaller."""
    _, h, w = x.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return x[:, top : top + height, left : left + width]
    ph, pw = max(height, h), max(width, w)
    padded = x.new_zeros(x.shape[0], ph, pw)
    t, l = (ph - h + 1) // 2, (pw - w + 1) // 2
    padded[:, t : t + h, l : l + w] = x
    top, left = (ph - height) // 2, (pw - width) // 2
    return padded[:, top : top + height, left : left + width]
