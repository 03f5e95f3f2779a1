"""Tiny vision models with random weights: a Llava (CLIP vision tower + projector + Llama) and a CLIP dual encoder.

Both write complete HF folders that transformers loads offline: :func:`build_tiny_llava` gives
``LlavaForConditionalGeneration`` with a ``LlavaProcessor`` (a CLIP image processor of small square
images, the tokenizer with its ``<image>`` token, a chat template that renders ``{"type": "image"}``
parts in order); :func:`build_tiny_clip` gives ``CLIPModel`` with its tokenizer and
``CLIPImageProcessor``. The same arguments always give the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .tokenizers import BOS, EOS, IM_END, IM_START, PAD, SPECIAL_TOKENS, _save, _train_bpe
from .weights import prepare_folder, write_config_and_weights

IMAGE_TOKEN = "<image>"
#: the Llava tokenizer's specials in id order: the chat specials, then the image token (id 5)
LLAVA_SPECIAL_TOKENS = (*SPECIAL_TOKENS, IMAGE_TOKEN)
#: the CLIP tokenizer's specials in id order (end of text is id 1, so its pooling reads the first EOS)
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<pad>")

#: ChatML with content parts in order: an image part is ``<image>`` and a newline
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _vision_config(image_size: int, patch_size: int, hidden_size: int, num_layers: int, num_heads: int,
                   projection_dim: int | None = None) -> dict[str, Any]:
    cfg = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
               num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size, num_channels=3,
               hidden_act="quick_gelu", layer_norm_eps=1e-5)
    if projection_dim is not None:
        cfg["projection_dim"] = projection_dim
    return cfg


def _image_processor(image_size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def build_tiny_llava(
    directory: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a tiny random Llava folder (CLIP tower of ``image_size`` square images, a Llama decoder)."""
    from transformers import GenerationConfig, LlavaProcessor, PreTrainedTokenizerFast

    directory, torch_dtype = prepare_folder(directory, dtype)
    ids = {tok: i for i, tok in enumerate(LLAVA_SPECIAL_TOKENS)}
    eos_ids = [ids[EOS], ids[IM_END]]
    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                head_dim=hidden_size // num_heads, max_position_embeddings=max_position_embeddings,
                initializer_range=round(hidden_size ** -0.5, 6), tie_word_embeddings=False, bos_token_id=ids[BOS],
                eos_token_id=eos_ids, pad_token_id=ids[PAD])
    num_patches = (image_size // patch_size) ** 2
    kwargs = dict(
        text_config=text,
        vision_config=_vision_config(image_size, patch_size, vision_hidden_size, vision_layers, vision_heads),
        image_token_index=ids[IMAGE_TOKEN], vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy, projector_hidden_act="gelu",
        image_seq_length=num_patches + (vision_feature_select_strategy == "full"), tie_word_embeddings=False,
    )
    write_config_and_weights(directory, "LlavaForConditionalGeneration", "LlavaConfig", kwargs, dtype=torch_dtype,
                             seed=seed, shards=1)
    GenerationConfig(bos_token_id=ids[BOS], eos_token_id=eos_ids, pad_token_id=ids[PAD]).save_pretrained(str(directory))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size, LLAVA_SPECIAL_TOKENS), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END, IMAGE_TOKEN], model_max_length=max_position_embeddings,
        clean_up_tokenization_spaces=False, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    _save(tokenizer, directory, vocab_size, exact=True)
    processor = LlavaProcessor(image_processor=_image_processor(image_size), tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy=vision_feature_select_strategy,
                               chat_template=LLAVA_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)
    processor.save_pretrained(str(directory))
    processor.image_processor.save_pretrained(str(directory))  # preprocessor_config.json, as hub folders have it
    return directory


def build_tiny_clip(
    directory: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 32,
    vocab_size: int = 512,
    max_position_embeddings: int = 77,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a tiny random CLIP folder (``CLIPModel``: text and vision towers, projections, both processors)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    directory, torch_dtype = prepare_folder(directory, dtype)
    bos, eos, pad = CLIP_SPECIAL_TOKENS
    ids = {tok: i for i, tok in enumerate(CLIP_SPECIAL_TOKENS)}
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                max_position_embeddings=max_position_embeddings, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                projection_dim=projection_dim, bos_token_id=ids[bos], eos_token_id=ids[eos], pad_token_id=ids[pad])
    kwargs = dict(text_config=text, projection_dim=projection_dim,
                  vision_config=_vision_config(image_size, patch_size, hidden_size, num_layers, num_heads,
                                               projection_dim))
    write_config_and_weights(directory, "CLIPModel", "CLIPConfig", kwargs, dtype=torch_dtype, seed=seed, shards=1)
    bpe = _train_bpe(vocab_size, CLIP_SPECIAL_TOKENS)
    bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
                                                       special_tokens=[(bos, ids[bos]), (eos, ids[eos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad,
                                        model_max_length=max_position_embeddings, clean_up_tokenization_spaces=False)
    _save(tokenizer, directory, vocab_size, exact=True)
    _image_processor(image_size).save_pretrained(str(directory))
    return directory


__all__ = ["CLIP_SPECIAL_TOKENS", "IMAGE_TOKEN", "LLAVA_CHAT_TEMPLATE", "LLAVA_SPECIAL_TOKENS", "build_tiny_clip",
           "build_tiny_llava"]
