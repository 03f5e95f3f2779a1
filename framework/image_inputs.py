"""What a served model does with the images of a request: fetch and decode them (:mod:`patchbay.media`),
preprocess them with the family's processor, and place them into prompts.

Endpoints reach it as ``ServedModel.images`` and stay wire-only: they collect ``(param, url)`` pairs from
the request, render ``image_token`` where an image goes, and hand the token ids back to :meth:`ImageSupport.place`,
which expands each image token into the image's placeholders and records where each image sits
(a :class:`~patchbay.model.MultimodalInputs` for the engine).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Sequence

import attrs

from patchbay.errors import bad_request
from patchbay.media import ImageInput, MediaFetcher, MediaPolicy
from patchbay.model import IMAGE_KINDS, MultimodalInputs, MultimodalItem, MultimodalModel

if TYPE_CHECKING:
    from patchbay.config import ServerConfig
    from patchbay.loader import LoadedModel


@attrs.frozen
class PreparedImage:
    """One image of a request, processed by the model family and ready to place."""

    #: hash of its pixels (prefix-cache keys, encoder cache)
    hash: str
    #: the family processor's output
    data: Any = attrs.field(repr=False)
    #: placeholder tokens (= embeddings) it becomes
    num_placeholders: int
    #: the request field it came from
    param: str


class ImageSupport:
    """A served model's image inputs (``available`` is False for a text-only model)."""

    def __init__(self, loaded: LoadedModel, config: ServerConfig, fetcher: MediaFetcher | None = None):
        model = loaded.model
        self.name = (config.served_model_name or (str(config.model),))[0]
        self.processor = model.processor if loaded.kind in IMAGE_KINDS else None
        #: a generative model's image token text and id (None for dual encoders and text-only models)
        self.image_token: str | None = model.image_token if loaded.kind is MultimodalModel else None
        self.placeholder_token_id: int | None = model.placeholder_token_id if loaded.kind is MultimodalModel else None
        self.fetcher = fetcher or MediaFetcher(MediaPolicy.from_config(config))
        #: most images one prompt may carry (--limit-mm-per-prompt), None: no limit
        self.limit: int | None = config.limit_mm_per_prompt.get("image")

    @property
    def available(self) -> bool:
        """The model takes images."""
        return self.processor is not None

    def require(self, param: str) -> None:
        """A 400 naming ``param`` unless the model takes images."""
        if not self.available:
            raise bad_request(f"The model `{self.name}` takes text only: image inputs are not supported.",
                              param=param, code="unsupported_content")

    async def prepare(self, urls: Sequence[tuple[str, str]],
                      known: dict[str, PreparedImage] | None = None) -> list[PreparedImage]:
        """Fetch, decode and preprocess the ``(param, url)`` images of one prompt (400s name their field).
        ``known`` (URL -> image), when given, holds images one request already prepared (a prompt rendered
        again, shorter) and gets the new ones."""
        if not urls:
            return []
        self.require(urls[0][0])
        if self.limit is not None and len(urls) > self.limit:
            raise bad_request(f"This prompt has {len(urls)} images; the server takes at most {self.limit} per prompt "
                              "(--limit-mm-per-prompt).", param=urls[self.limit][0], code="too_many_images")
        todo = [(param, url) for param, url in urls if known is None or url not in known]
        images = await asyncio.to_thread(self._process, await self.fetcher.images(todo)) if todo else []
        if known is None:
            return images
        known.update(zip((url for _, url in todo), images))
        return [known[url] for _, url in urls]

    def _process(self, images: list[ImageInput]) -> list[PreparedImage]:
        out = []
        for image in images:
            try:
                data = self.processor(image.image)
            except (ValueError, OSError) as exc:
                raise bad_request(f"{image.param}: the image cannot be processed: {exc}", param=image.param,
                                  code="invalid_image") from None
            out.append(PreparedImage(image.hash, data, int(self.processor.num_placeholders(data)), image.param))
        return out

    def place(self, ids: list[int], images: Sequence[PreparedImage], param: str) -> tuple[list[int], MultimodalInputs]:
        """``ids`` with each image token expanded to its image's placeholders, and where each image sits.
        The image tokens must be as many as the images (else a 400 naming ``param``)."""
        token = self.placeholder_token_id
        found = sum(1 for t in ids if t == token)
        if found != len(images):
            raise bad_request(f"The prompt has {found} image placeholder(s) ({self.image_token!r}) for {len(images)} "
                              "image(s): the chat template must render each image part once, and text must not "
                              "contain the image token.", param=param, code="image_placeholder_mismatch")
        out: list[int] = []
        items = []
        pending = iter(images)
        for t in ids:
            if t != token:
                out.append(t)
                continue
            image = next(pending)
            items.append(MultimodalItem(offset=len(out), length=image.num_placeholders, hash=image.hash,
                                        data=image.data))
            out.extend([token] * image.num_placeholders)
        return out, MultimodalInputs(tuple(items))

    @staticmethod
    def shift(mm: MultimodalInputs, cut: int, param: str) -> MultimodalInputs:
        """The images of a prompt whose first ``cut`` tokens were cut off; a 400 naming ``param`` if that cuts into
        an image."""
        if not cut:
            return mm
        if mm.items[0].offset < cut:
            raise bad_request("Truncating the prompt would cut into an image: keep more tokens.", param=param)
        return MultimodalInputs(tuple(attrs.evolve(it, offset=it.offset - cut) for it in mm.items))

    @staticmethod
    def alone(image: PreparedImage) -> tuple[list[int], MultimodalInputs]:
        """The prompt of one image on its own (a dual encoder's image input): its placeholders only."""
        item = MultimodalItem(offset=0, length=image.num_placeholders, hash=image.hash, data=image.data)
        return [0] * image.num_placeholders, MultimodalInputs((item,))
