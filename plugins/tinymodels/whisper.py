"""Tiny Whisper models (``WhisperForConditionalGeneration``) with random weights, laid out as real ones.

:func:`build_tiny_whisper` writes a complete HF folder: ``config.json``,
safetensors weights (the output projection tied to the token embeddings and
left out, as in OpenAI's checkpoints), ``generation_config.json`` with every
Whisper key ``generate`` reads (``lang_to_id``, ``task_to_id``,
``no_timestamps_token_id``, ``suppress_tokens``, ``begin_suppress_tokens``,
``alignment_heads``, ...), ``preprocessor_config.json`` (a
``WhisperFeatureExtractor``) and a ``WhisperTokenizer``: a locally trained
byte-level BPE for text followed by Whisper's special tokens in Whisper's
order — ``<|endoftext|>``, ``<|startoftranscript|>``, one token per language
(transformers' ``LANGUAGES`` order), ``<|translate|>``, ``<|transcribe|>``,
``<|startoflm|>``, ``<|startofprev|>``, ``<|nospeech|>``,
``<|notimestamps|>`` and the 1501 timestamps ``<|0.00|>`` .. ``<|30.00|>``.
``transformers.WhisperForConditionalGeneration`` and ``WhisperProcessor``
load it offline; they are the tests' oracles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .tokenizers import _train_bpe
from .weights import _random_state_dict, _save_weights, prepare_folder

ARCHITECTURE = "WhisperForConditionalGeneration"
EOT, SOT = "<|endoftext|>", "<|startoftranscript|>"
TASK_TOKENS = ("<|translate|>", "<|transcribe|>")
AFTER_TASKS = ("<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>")
#: timestamps every 0.02 s over a 30 s window
NUM_TIMESTAMPS = 1501


def whisper_special_tokens(multilingual: bool = True) -> list[str]:
    """Whisper's special tokens in id order, starting with ``<|endoftext|>``."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    langs = [f"<|{code}|>" for code in LANGUAGES] if multilingual else []
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(NUM_TIMESTAMPS)]
    return [EOT, SOT, *langs, *TASK_TOKENS, *AFTER_TASKS, *stamps]


def benchmark_whisper_config() -> dict[str, Any]:
    """Builder arguments of the benchmark Whisper (~22M parameters: whisper-tiny's shape with a smaller
    vocabulary)."""
    return dict(d_model=384, encoder_layers=4, decoder_layers=4, heads=6, ffn_dim=1536, text_vocab_size=4000,
                max_target_positions=448, seed=0)


def build_tiny_whisper(
    directory: str | os.PathLike,
    *,
    d_model: int = 64,
    encoder_layers: int = 2,
    decoder_layers: int = 2,
    heads: int = 4,
    ffn_dim: int = 128,
    num_mel_bins: int = 80,
    text_vocab_size: int = 600,
    max_target_positions: int = 96,
    multilingual: bool = True,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a complete HF Whisper folder with random weights into ``directory``; return its path.

    Encoder windows are Whisper's (30 s: 3000 mel frames, 1500 encoder positions); the
    decoder takes ``max_target_positions`` tokens (448 in real Whisper; fewer keep tests
    fast, since random weights rarely say ``<|endoftext|>``). ``init_std`` is
    ``d_model ** -0.5`` so that logits are far from uniform (greedy decoding is then
    decisive, not decided by rounding).
    """
    import transformers
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperTokenizer

    directory, torch_dtype = prepare_folder(directory, dtype)
    bpe = _train_bpe(text_vocab_size, ())
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
    if len(vocab) != text_vocab_size:
        raise ValueError(f"the corpus gives {len(vocab)} text tokens, not {text_vocab_size}")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    specials = whisper_special_tokens(multilingual)
    tok = WhisperTokenizer(vocab=vocab, merges=merges, extra_special_tokens=specials[1:],
                           model_max_length=max_target_positions)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    assert [ids[t] for t in specials] == list(range(text_vocab_size, text_vocab_size + len(specials))), "id order"
    eot, sot = ids[EOT], ids[SOT]
    space = tok.convert_tokens_to_ids("Ġ")
    # suppressed always (as Whisper suppresses symbols): the lone non-ASCII bytes (random weights would
    # otherwise spell broken UTF-8), a few symbols, and Whisper's own specials
    partial = [i for i in range(text_vocab_size) if "\ufffd" in tok.decode([i])]
    suppress = sorted({*partial, *range(3, 40, 7), ids[TASK_TOKENS[0]], ids[TASK_TOKENS[1]],
                       ids["<|startoflm|>"], ids["<|startofprev|>"], ids["<|nospeech|>"]})
    config = transformers.WhisperConfig(
        vocab_size=len(tok), num_mel_bins=num_mel_bins, d_model=d_model,
        encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim,
        max_source_positions=1500, max_target_positions=max_target_positions,
        decoder_start_token_id=sot, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        begin_suppress_tokens=[space, eot], suppress_tokens=suppress,
        init_std=round(d_model ** -0.5, 6), tie_word_embeddings=True,
    )
    config.architectures = [ARCHITECTURE]
    config.dtype = torch_dtype
    state = _random_state_dict(config, ARCHITECTURE, seed, torch_dtype)
    state.pop("proj_out.weight", None)  # tied to model.decoder.embed_tokens.weight, as OpenAI's checkpoints
    config.save_pretrained(str(directory))
    _save_weights(directory, state, 1)

    gen: dict[str, Any] = dict(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=max_target_positions, begin_suppress_tokens=[space, eot], suppress_tokens=suppress,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50, return_timestamps=False, is_multilingual=multilingual,
        # the heads whose cross-attention aligns tokens with audio: the upper half of the decoder
        alignment_heads=[[layer, h] for layer in range(decoder_layers // 2, decoder_layers) for h in range(heads)],
    )
    if multilingual:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        gen["lang_to_id"] = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES}
        gen["task_to_id"] = {"translate": ids[TASK_TOKENS[0]], "transcribe": ids[TASK_TOKENS[1]]}
    GenerationConfig(**gen).save_pretrained(str(directory))
    WhisperFeatureExtractor(feature_size=num_mel_bins).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory
