"""The llava and clip families against transformers: image preprocessing, image features, text features; the
multimodal kinds of the model contract; image hashes in prefix-cache keys; the encoder cache."""

from __future__ import annotations

import functools

import pytest
import torch

import imagekit
from patchbay.engine.blocks import BlockManager
from patchbay.engine.multimodal import EncoderCache, block_extra
from patchbay.model import (
    GenerativeModel,
    LoadRequest,
    MultimodalInputs,
    MultimodalItem,
    MultimodalModel,
    MultimodalPoolingModel,
    check_model,
    protocol_members,
)

CASES = [(40, 48, "RGB"), (32, 32, "RGB"), (100, 30, "RGBA"), (17, 20, "L"), (64, 64, "P"), (300, 200, "RGB")]


def _load(family, model_dir, task):
    from transformers import AutoConfig

    return family.load(LoadRequest(model_dir=model_dir, hf_config=AutoConfig.from_pretrained(model_dir), task=task,
                                   dtype=torch.float32, device=torch.device("cpu")))


@functools.lru_cache(maxsize=None)
def llava_pair(model_dir):
    from transformers import LlavaForConditionalGeneration

    from patchbay_plugins.models import llava

    return _load(llava, model_dir, "generate"), LlavaForConditionalGeneration.from_pretrained(model_dir).eval()


@functools.lru_cache(maxsize=None)
def clip_pair(model_dir):
    from transformers import CLIPModel

    from patchbay_plugins.models import clip

    return _load(clip, model_dir, "embed"), CLIPModel.from_pretrained(model_dir).eval()


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize("width,height,mode", CASES)
def test_preprocessing_equals_transformers(tiny_llava, width, height, mode):
    """Resize (Pillow's two 8-bit bicubic passes), crop, rescale, normalise: equal to transformers'
    CLIPImageProcessor within one 8-bit level (Pillow's fixed-point rounding, rarely)."""
    from transformers import AutoImageProcessor

    model, _ = llava_pair(tiny_llava)
    img = imagekit.image(width, height, 3, mode)
    want = AutoImageProcessor.from_pretrained(tiny_llava)(img, return_tensors="pt")["pixel_values"][0]
    got = model.processor(img)
    assert got.shape == want.shape == (3, 32, 32)
    diff = (got - want).abs()
    assert float(diff.max()) <= 1 / 255 / 0.26 + 1e-5
    assert float((diff > 1e-5).float().mean()) < 0.05


def test_llava_image_features_equal_transformers(tiny_llava):
    model, ref = llava_pair(tiny_llava)
    pixels = torch.stack([model.processor(imagekit.image(w, h, s, m)) for s, (w, h, m) in enumerate(CASES)])
    with torch.no_grad():
        want = _features(ref.model.get_image_features(pixel_values=pixels))
    got = model.embed_items(list(pixels))
    assert len(got) == len(CASES) and got[0].shape == (16, 64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.reshape(g.shape), atol=2e-5, rtol=1e-4)
    assert model.processor.num_placeholders(pixels[0]) == 16


def test_clip_features_equal_transformers(tiny_clip):
    from transformers import AutoTokenizer

    model, ref = clip_pair(tiny_clip)
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    texts = ["a cat", "the river flows north today and the boats go with it"]
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            want = _features(ref.get_text_features(**enc))
            torch.testing.assert_close(model.text_features([enc["input_ids"][0].tolist()]), want, atol=2e-5,
                                       rtol=1e-4)
        # a batch of unequal lengths (right-padded inside) pools each at its own end of text
        ids = [tok(t)["input_ids"] for t in texts]
        batch = model.text_features(ids)
        for i, t in enumerate(texts):
            torch.testing.assert_close(batch[i : i + 1], _features(ref.get_text_features(**tok(t, return_tensors="pt"))),
                                       atol=2e-5, rtol=1e-4)
        pixels = torch.stack([model.processor(imagekit.image(w, h, s, m)) for s, (w, h, m) in enumerate(CASES)])
        want = _features(ref.get_image_features(pixel_values=pixels))
        torch.testing.assert_close(model.image_features(pixels), want, atol=2e-5, rtol=1e-4)


def test_the_families_load_as_the_multimodal_kinds(tiny_llava, tiny_clip):
    assert check_model("llava", "generate", llava_pair(tiny_llava)[0]) is MultimodalModel
    assert check_model("clip", "embed", clip_pair(tiny_clip)[0]) is MultimodalPoolingModel
    assert {"processor", "image_token", "placeholder_token_id", "embed_items", "embed_input_ids",
            "forward_embeds"} == set(protocol_members(MultimodalModel)) - set(protocol_members(GenerativeModel))
    model = llava_pair(tiny_llava)[0]
    assert model.image_token == "<image>" and model.placeholder_token_id == 5


def test_llava_checkpoint_names_of_both_layouts():
    from patchbay_plugins.models.llava import checkpoint_name

    assert checkpoint_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert checkpoint_name("language_model.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert checkpoint_name("language_model.lm_head.weight") == "lm_head.weight"
    assert checkpoint_name("lm_head.weight") == "lm_head.weight"
    assert checkpoint_name("vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias") == \
        "vision_tower.encoder.layers.1.mlp.fc1.bias"
    assert checkpoint_name("model.vision_tower.embeddings.class_embedding") == "vision_tower.embeddings.class_embedding"
    assert checkpoint_name("model.multi_modal_projector.linear_1.weight") == "multi_modal_projector.linear_1.weight"


# --------------------------------------------------------------------------- prefix-cache keys, encoder cache


def _mm(*items):
    return MultimodalInputs(tuple(MultimodalItem(offset=o, length=n, hash=h, data=None) for o, n, h in items))


def test_block_keys_carry_the_image_hashes():
    """Same token ids, different images: the blocks the placeholders touch get different keys (and so do all
    blocks after them, the keys being a chain); text blocks before the first image stay shareable."""
    bm = BlockManager(16, 4)
    ids = list(range(100, 104)) + [5] * 6 + list(range(200, 206))  # text block, then an image at 4..9, then text
    a = bm.block_keys(ids, None, 4, extra=block_extra(_mm((4, 6, "image-a")), 4))
    b = bm.block_keys(ids, None, 4, extra=block_extra(_mm((4, 6, "image-b")), 4))
    plain = bm.block_keys(ids, None, 4)
    assert a[0] == b[0] == plain[0]
    assert all(x != y for x, y in zip(a[1:], b[1:]))
    assert a[1] != plain[1]
    # the same image elsewhere in the block is another key too
    c = bm.block_keys(ids, None, 4, extra=block_extra(_mm((5, 6, "image-a")), 4))
    assert c[1] != a[1]
    # a registered image prompt is found only with its own image
    blocks = bm.allocate(4)
    for block, key in zip(blocks, a):
        bm.register(block, key)
    assert len(bm.match_prefix(ids, None, block_extra(_mm((4, 6, "image-a")), 4))) == 4
    assert len(bm.match_prefix(ids, None, block_extra(_mm((4, 6, "image-b")), 4))) == 1
    assert len(bm.match_prefix(ids, None)) == 1


def test_encoder_cache_is_bounded_least_recently_used_first_out():
    cache = EncoderCache(capacity=10)
    cache.put("a", torch.zeros(4, 2))
    cache.put("b", torch.zeros(4, 2))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", torch.zeros(4, 2))  # evicts b
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.rows == 8 and len(cache) == 2
    cache.put("huge", torch.zeros(11, 2))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.rows == 8
    assert (cache.hits, cache.misses) == (3, 2)
    empty = EncoderCache(0)
    empty.put("a", torch.zeros(1, 2))
    assert empty.get("a") is None
