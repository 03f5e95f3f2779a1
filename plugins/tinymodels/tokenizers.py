"""The tiny models' tokenizers, trained locally and deterministically on a small bundled corpus.

- decoders: a byte-level BPE of exactly ``vocab_size`` ids (:data:`SPECIAL_TOKENS`
  first) with a ChatML chat template (:func:`save_chat_tokenizer`);
- BERT encoders: a lower-casing WordPiece vocabulary (:func:`wordpiece_vocab`);
  RoBERTa / XLM-R encoders: a byte-level BPE with RoBERTa's specials
  (:func:`save_encoder_tokenizer`).

Random weights sample any token id, so a decoder's tokenizer is built such that
``len(tokenizer) == config.vocab_size`` and every non-special id decodes to
non-empty text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
#: Special tokens, in id order (ids 0..4).
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)

#: ChatML: ``<|im_start|>role\ncontent<|im_end|>\n`` per message.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Hermes / Qwen2.5-style ChatML that renders ``tools`` (a system block listing them) and tool turns:
#: an assistant's ``tool_calls`` as ``<tool_call>`` blocks, ``tool`` messages as ``<tool_response>`` in a user turn.
HERMES_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
#: Markup tokens of Qwen2.5 / Qwen3-style models: added to the vocabulary as ordinary (not special) tokens,
#: so they are in the decoded text (``build_tiny_model(added_tokens=TOOL_TOKENS)``).
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")

#: WordPiece specials of the tiny BERT tokenizer, in id order (``[PAD]`` is 0 as in BERT).
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Byte-level BPE specials of the tiny RoBERTa / XLM-R tokenizer, in id order (``<pad>`` is 1 as in RoBERTa).
ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

#: The bundled training text (package data).
CORPUS_FILE = Path(__file__).with_name("data") / "tiny_corpus.txt"


# --------------------------------------------------------------------------- training text


def _generated_text(num_words: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English lines: enough distinct words for BPE to reach large vocabularies."""
    rng = random.Random(seed)
    onsets = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl gr br qu".split() + [""]
    vowels = "a e i o u ai ea ou io y".split()
    codas = "n r s t l m nd st rk ng x".split() + [""]
    words = []
    for _ in range(num_words):
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 3)))
        words.append(w.capitalize() if rng.random() < 0.1 else w)
    return [" ".join(words[i : i + 12]) + "." for i in range(0, len(words), 12)]


def _corpus(vocab_size: int) -> list[str]:
    corpus = [CORPUS_FILE.read_text(encoding="utf-8")]
    if vocab_size > 1024:
        corpus += _generated_text(3 * vocab_size)
    return corpus


# --------------------------------------------------------------------------- training


def train_tokenizer(vocab_size: int, added_tokens: tuple[str, ...] = ()):
    """A byte-level BPE ``tokenizers.Tokenizer`` of exactly ``vocab_size`` ids (specials first, ``added_tokens``
    last, as ordinary added tokens)."""
    if not added_tokens:
        return _train_bpe(vocab_size, SPECIAL_TOKENS)
    from tokenizers import AddedToken

    tok = _train_bpe(vocab_size - len(added_tokens), SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok


def _train_bpe(vocab_size: int, special_tokens: tuple[str, ...]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(special_tokens) + len(alphabet)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} for a byte-level tokenizer, got {vocab_size}")
    corpus = _corpus(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=alphabet,
        min_frequency=0,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:  # corpus exhausted: pad with ordinary tokens that decode to themselves
        tok.add_tokens([AddedToken(f"<unused{i}>", special=False, normalized=False) for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok


def wordpiece_vocab(vocab_size: int) -> dict[str, int]:
    """A BERT-style WordPiece vocabulary of at most ``vocab_size`` ids (specials first), deterministically.

    ``tokenizers``' WordPieceTrainer numbers its ``##`` continuation alphabet
    in hash order, so its output changes from run to run. Instead: train a
    plain BPE on the lower-cased, BERT-pre-tokenized corpus (deterministic),
    then take its tokens in training order, each as a word start ``t`` and a
    continuation ``##t``. Every character is in both forms, so every word
    splits; ``transformers.BertTokenizer`` adds BERT's normaliser,
    pre-tokenizer and ``[CLS] A [SEP] B [SEP]`` post-processor.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BERT_SPECIAL_TOKENS), min_frequency=0, show_progress=False
    )
    tok.train_from_iterator(_corpus(vocab_size), trainer)
    vocab = {t: i for i, t in enumerate(BERT_SPECIAL_TOKENS)}
    for token, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        for piece in (token, "##" + token):
            if token not in BERT_SPECIAL_TOKENS and piece not in vocab and len(vocab) < vocab_size:
                vocab[piece] = len(vocab)
    return vocab


# --------------------------------------------------------------------------- saving as transformers tokenizers


def _save(tok: Any, directory: Path, vocab_size: int, *, exact: bool) -> None:
    """Save the transformers tokenizer ``tok`` into ``directory`` once it has exactly (``exact``) /
    at most ``vocab_size`` ids."""
    if len(tok) > vocab_size or (exact and len(tok) != vocab_size):
        expected = f"expected {vocab_size}" if exact else f"more than vocab_size {vocab_size}"
        raise AssertionError(f"tokenizer has {len(tok)} ids, {expected}")
    tok.save_pretrained(str(directory))


def save_chat_tokenizer(directory: Path, vocab_size: int, max_length: int, chat_template: str | None,
                        added_tokens: tuple[str, ...] = ()) -> None:
    """Save a decoder's byte-level BPE tokenizer of exactly ``vocab_size`` ids, with ``chat_template``."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size, tuple(added_tokens)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )
    _save(fast, directory, vocab_size, exact=True)


def save_encoder_tokenizer(directory: Path, family: str, vocab_size: int, max_length: int) -> None:
    """Save a BertTokenizer (``family == "bert"``: WordPiece) or RobertaTokenizer (byte-level BPE)
    of at most ``vocab_size`` ids."""
    if family == "bert":
        from transformers import BertTokenizer

        vocab = wordpiece_vocab(vocab_size)
        for i in range(vocab_size - len(vocab)):  # corpus exhausted: BERT's own [unusedN] fillers
            vocab[f"[unused{i}]"] = len(vocab)
        tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=max_length)
    else:
        from transformers import RobertaTokenizer

        bpe = _train_bpe(vocab_size, ROBERTA_SPECIAL_TOKENS)
        model = json.loads(bpe.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
        tok = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    _save(tok, directory, vocab_size, exact=False)
