"""The "whisper" model family: ``WhisperForConditionalGeneration`` as an encoder-decoder speech model.

It serves the task ``transcription`` (vLLM's word) through the model contract's
:class:`~patchbay.model.EncoderDecoderModel`: the audio encoder runs once per
30 s window, batched across the requests an engine step admits, and computes
every decoder layer's cross-attention keys and values into a per-request state;
the decoder runs on the shared scheduler, its self-attention over the paged KV
cache. Its :class:`~patchbay.model.SpeechProcessor` (``processor.py``) computes
the log-mel features (as transformers' ``WhisperFeatureExtractor``), builds the
prompts and decoding rules (language detection, ``suppress_tokens``, timestamp
rules; ``rules.py``) and reads outputs into text, segments and words (word
times from the alignment heads' cross-attention, ``alignment.py``).

Module import is light (no torch); torch is imported when a model is loaded.
"""

from __future__ import annotations

from patchbay import hookimpl
from patchbay.model import LoadRequest
from patchbay.registry import ModelFamily

ARCHITECTURES = ("WhisperForConditionalGeneration",)


@hookimpl
def register_model_families(register):
    register(ModelFamily(name="whisper", architectures=ARCHITECTURES, tasks=frozenset({"transcription"}), load=load))


def load(request: LoadRequest):
    """The :class:`~patchbay.model.EncoderDecoderModel` of ``request.model_dir``, with its processor."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from patchbay_plugins.models.whisper.layout import layout_of, read_json
    from patchbay_plugins.models.whisper.model import WhisperModel
    from patchbay_plugins.models.whisper.processor import WhisperSpeech

    model_dir = Path(request.model_dir)
    lay = layout_of(request.hf_config)
    gen = read_json(model_dir / "generation_config.json")
    pre = read_json(model_dir / "preprocessor_config.json")
    for key in ("suppress_tokens", "begin_suppress_tokens"):  # older folders keep these in config.json
        if gen.get(key) is None and getattr(request.hf_config, key, None) is not None:
            gen[key] = list(getattr(request.hf_config, key))
    if pre.get("feature_size", lay.num_mel_bins) != lay.num_mel_bins:
        raise ValueError(f"whisper family: preprocessor_config.json has feature_size {pre['feature_size']}, "
                         f"the model takes {lay.num_mel_bins} mel bins")
    pre.setdefault("feature_size", lay.num_mel_bins)
    heads = [(int(layer), int(head)) for layer, head in gen.get("alignment_heads") or []]
    model = WhisperModel.from_checkpoint(model_dir, lay, heads, int(getattr(request.hf_config, "median_filter_width", 7)),
                                         request.dtype, request.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.processor = WhisperSpeech(tokenizer, gen, pre, lay.vocab_size, lay.max_target_positions)
    return model


__all__ = ["ARCHITECTURES", "load", "register_model_families"]
