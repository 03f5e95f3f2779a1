"""Tiny Hugging Face model directories with random weights, built locally and deterministically.

Nothing here downloads anything. A builder writes a complete HF model folder
(``config.json``, safetensors weights, a tokenizer trained on a small bundled
corpus) that ``transformers`` loads offline, and that patchbay loads through
exactly the same path as a real checkpoint. The same arguments always give
the same bytes.

- :func:`build_tiny_model` (:mod:`.decoders`): llama-family decoders with a
  byte-level BPE tokenizer and a ChatML chat template; tests build small ones
  (hidden 64, vocab 512) in well under a second; tool-calling tests give them
  :data:`HERMES_CHAT_TEMPLATE` and the markup :data:`TOOL_TOKENS`; also the architectures only
  the transformers fallback serves (:data:`FALLBACK_ARCHITECTURES`, :mod:`.zoo`:
  Gemma 2/3, Phi-3, GPT-NeoX, Granite, OLMo 2, StableLM, GPT-2, Mixtral,
  Qwen3-MoE), with the options that make their attention matter;
- :func:`build_demo_model` is the chat model ``serve`` runs when given none;
- :func:`build_benchmark_model` is the ~34M-parameter model benchmarks use;
- :func:`build_tiny_encoder` (:mod:`.encoders`) writes BERT / RoBERTa / XLM-R
  encoders and cross-encoders (and ModernBERT / NomicBERT,
  :data:`FALLBACK_ENCODERS`), optionally as a sentence-transformers folder
  (:func:`write_sentence_transformers_files`);
- :mod:`.tokenizers` trains the tokenizers;
- :func:`build_tiny_whisper` (:mod:`.whisper`) writes Whisper speech models
  (encoder-decoder, ``WhisperProcessor`` files, Whisper's special tokens);
  :func:`benchmark_whisper_config` is the benchmark's;
- :func:`cached_model` (:func:`cached_encoder`, :mod:`.cache`) builds once
- :func:`build_tiny_llava` and :func:`build_tiny_clip` (:mod:`.vision`): a Llava (CLIP
  vision tower, projector, Llama) with its processor, and a CLIP dual encoder;
- :func:`cached_model` (:func:`cached_encoder`, :func:`cached_llava`, :func:`cached_clip`, :mod:`.cache`) builds once
  into ``~/.cache/patchbay/models`` and reuses.

This is a library for tests, benchmarks and the demo, not a serve plugin: it
registers no hooks. Import is light (no torch until a builder runs).
"""

from .cache import BUILDER_VERSION, cache_key, cached_clip, cached_encoder, cached_llava, cached_model, default_cache_root
from .decoders import (
    ARCHITECTURES,
    benchmark_model_config,
    build_benchmark_model,
    build_demo_model,
    build_tiny_model,
    demo_model_config,
)
from .encoders import ENCODER_ARCHITECTURES, build_tiny_encoder, write_sentence_transformers_files
from .whisper import benchmark_whisper_config, build_tiny_whisper
from .zoo import FALLBACK_ARCHITECTURES, FALLBACK_ENCODERS
from .tokenizers import (
    BERT_SPECIAL_TOKENS,
    DEFAULT_CHAT_TEMPLATE,
    HERMES_CHAT_TEMPLATE,
    ROBERTA_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    TOOL_TOKENS,
    train_tokenizer,
    wordpiece_vocab,
)
from .vision import IMAGE_TOKEN, build_tiny_clip, build_tiny_llava

__all__ = [
    "ARCHITECTURES",
    "BERT_SPECIAL_TOKENS",
    "BUILDER_VERSION",
    "DEFAULT_CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "ENCODER_ARCHITECTURES",
    "FALLBACK_ARCHITECTURES",
    "FALLBACK_ENCODERS",
    "HERMES_CHAT_TEMPLATE",
    "ROBERTA_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "TOOL_TOKENS",
    "benchmark_model_config",
    "benchmark_whisper_config",
    "build_benchmark_model",
    "build_demo_model",
    "build_tiny_clip",
    "build_tiny_encoder",
    "build_tiny_llava",
    "build_tiny_model",
    "build_tiny_whisper",
    "cache_key",
    "cached_clip",
    "cached_encoder",
    "cached_llava",
    "cached_model",
    "default_cache_root",
    "demo_model_config",
    "train_tokenizer",
    "wordpiece_vocab",
    "write_sentence_transformers_files",
]
