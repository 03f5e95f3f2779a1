"""Tiny Hugging Face model directories with random weights, built locally and deterministically.

Nothing here downloads anything. :func:`build_tiny_model` writes a complete HF
model folder (``config.json``, safetensors weights, ``generation_config.json``,
a byte-level BPE tokenizer trained on a small bundled corpus, a ChatML chat
template) that ``transformers.AutoTokenizer`` / ``AutoModelForCausalLM`` load
offline, and that patchbay loads through exactly the same path as a real
checkpoint. The same arguments always give the same bytes.

- tests build small models (hidden 64, vocab 512) in well under a second;
- :func:`build_demo_model` is the chat model ``serve`` runs when given none;
- :func:`build_benchmark_model` is the ~34M-parameter model benchmarks use;
- :func:`build_tiny_encoder` writes BERT / RoBERTa / XLM-R encoders and
  cross-encoders, optionally as a sentence-transformers folder;
- :func:`cached_model` (:func:`cached_encoder`) builds once into
  ``~/.cache/patchbay/models`` and reuses.

Random weights sample any token id, so the tokenizer is built such that
``len(tokenizer) == config.vocab_size`` and every non-special id decodes to
non-empty text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

#: Bump when the output of the builder changes for the same arguments.
BUILDER_VERSION = 1

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

#: architecture -> transformers config class name
ARCHITECTURES = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
}

_CORPUS_FILE = Path(__file__).with_name("data") / "tiny_corpus.txt"


# --------------------------------------------------------------------------- configs of the named models


def demo_model_config() -> dict[str, Any]:
    """Builder arguments of the demo chat model ``serve`` runs when given no model."""
    return dict(
        arch="LlamaForCausalLM",
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=704,
        vocab_size=4096,
        max_position_embeddings=4096,
        dtype="float32",
        seed=0,
    )


def benchmark_model_config(dtype: str = "float32") -> dict[str, Any]:
    """Builder arguments of the benchmark model (~34M parameters)."""
    return dict(
        arch="LlamaForCausalLM",
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        intermediate_size=1408,
        vocab_size=8000,
        max_position_embeddings=4096,
        dtype=dtype,
        seed=0,
    )


def build_demo_model(directory: str | os.PathLike) -> Path:
    return build_tiny_model(directory, **demo_model_config())


def build_benchmark_model(directory: str | os.PathLike, dtype: str = "float32") -> Path:
    return build_tiny_model(directory, **benchmark_model_config(dtype))


# --------------------------------------------------------------------------- tokenizer


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


def train_tokenizer(vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` of exactly ``vocab_size`` ids (specials first)."""
    return _train_bpe(vocab_size, SPECIAL_TOKENS)


def _corpus(vocab_size: int) -> list[str]:
    corpus = [_CORPUS_FILE.read_text(encoding="utf-8")]
    if vocab_size > 1024:
        corpus += _generated_text(3 * vocab_size)
    return corpus


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


def _save_tokenizer(directory: Path, vocab_size: int, max_length: int, chat_template: str | None) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )
    if len(fast) != vocab_size:
        raise AssertionError(f"tokenizer has {len(fast)} ids, expected {vocab_size}")
    fast.save_pretrained(str(directory))


# --------------------------------------------------------------------------- weights


def _random_state_dict(config, arch: str, seed: int, dtype) -> dict:
    import torch
    import transformers

    model_cls = getattr(transformers, arch)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_cls(config)
    # transformers initialises norms to 1 and biases to 0; make them random so
    # that tests exercise them (Qwen2 qkv bias, Qwen3 q_norm/k_norm).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    state = {}
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        state[name] = t.detach().to(dtype).contiguous().clone()
    return state


def _save_weights(directory: Path, state: dict, shards: int) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if shards <= 1:
        save_file(state, str(directory / "model.safetensors"), metadata=meta)
        return
    names = list(state)
    if shards > len(names):
        raise ValueError(f"shards={shards} exceeds the number of tensors ({len(names)})")
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc, prev, n = 0, 0, len(names)
    for i, (name, size) in enumerate(zip(names, sizes)):
        # by cumulative size, never backwards, never skipping a shard, and
        # leaving at least one tensor for every remaining shard
        shard = min(acc * shards // total, shards - 1, prev + 1)
        shard = max(shard, prev, shards - (n - i))
        groups[shard].append(name)
        acc, prev = acc + size, shard
    weight_map = {}
    for j, group in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in group}, str(directory / fname), metadata=meta)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- the builder


def build_tiny_model(
    directory: str | os.PathLike,
    arch: str = "LlamaForCausalLM",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    shards: int = 1,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    head_dim: int | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a complete HF model folder with random weights into ``directory``; return its path.

    ``config_overrides`` go to the transformers config class as they are
    (e.g. ``rope_parameters``, ``attention_bias``, ``rms_norm_eps``,
    ``sliding_window``). ``initializer_range`` defaults to
    ``hidden_size ** -0.5`` so that attention and logits are far from uniform.
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHITECTURES)}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model*.safetensors"), directory / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a previous build into the same directory

    special_ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    eos_ids = [special_ids[EOS], special_ids[IM_END]]
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=round(hidden_size**-0.5, 6),
        bos_token_id=special_ids[BOS],
        eos_token_id=eos_ids,
        pad_token_id=special_ids[PAD],
    )
    kwargs.update(config_overrides)
    config_cls = getattr(transformers, ARCHITECTURES[arch])
    config = config_cls(**kwargs)
    config.architectures = [arch]
    config.dtype = torch_dtype

    state = _random_state_dict(config, arch, seed, torch_dtype)
    config.save_pretrained(str(directory))
    _save_weights(directory, state, shards)
    GenerationConfig(bos_token_id=special_ids[BOS], eos_token_id=eos_ids, pad_token_id=special_ids[PAD]).save_pretrained(
        str(directory)
    )
    _save_tokenizer(directory, vocab_size, max_position_embeddings, chat_template)
    return directory


# --------------------------------------------------------------------------- encoders (BERT / RoBERTa / XLM-R)

#: encoder architecture -> (transformers config class name, model_type family of the tokenizer)
ENCODER_ARCHITECTURES = {
    "BertModel": ("BertConfig", "bert"),
    "BertForSequenceClassification": ("BertConfig", "bert"),
    "RobertaModel": ("RobertaConfig", "roberta"),
    "RobertaForSequenceClassification": ("RobertaConfig", "roberta"),
    "XLMRobertaModel": ("XLMRobertaConfig", "roberta"),
    "XLMRobertaForSequenceClassification": ("XLMRobertaConfig", "roberta"),
}
#: WordPiece specials of the tiny BERT tokenizer, in id order (``[PAD]`` is 0 as in BERT).
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Byte-level BPE specials of the tiny RoBERTa / XLM-R tokenizer, in id order (``<pad>`` is 1 as in RoBERTa).
ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


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


def _save_encoder_tokenizer(directory: Path, family: str, vocab_size: int, max_length: int) -> None:
    """Save a BertTokenizer (WordPiece) or RobertaTokenizer (byte-level BPE) of at most ``vocab_size`` ids."""
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
    if len(tok) > vocab_size:
        raise AssertionError(f"tokenizer has {len(tok)} ids, more than vocab_size {vocab_size}")
    tok.save_pretrained(str(directory))


def _random_encoder_state_dict(config, arch: str, seed: int, dtype) -> dict:
    import torch
    import transformers

    model_cls = getattr(transformers, arch)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_cls(config)
    # LayerNorms start at 1 / 0 and biases at 0: make them random so that tests exercise them.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.lower().endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return {name: t.detach().to(dtype).contiguous().clone() for name, t in model.state_dict().items()}


def build_tiny_encoder(
    directory: str | os.PathLike,
    arch: str = "BertModel",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int | None = None,
    num_labels: int = 1,
    sentence_transformers: bool | str = False,
    normalize: bool = True,
    max_seq_length: int | None = None,
    st_legacy_keys: bool = True,
    dtype: str = "float32",
    seed: int = 0,
    shards: int = 1,
    **config_overrides: Any,
) -> Path:
    """Write a complete HF folder of a tiny random BERT / RoBERTa / XLM-R encoder; return its path.

    ``arch`` is one of :data:`ENCODER_ARCHITECTURES` (bare encoders and
    ``...ForSequenceClassification`` cross-encoders with ``num_labels``).
    BERT gets a lower-casing WordPiece tokenizer (``[PAD]`` 0, ``[UNK]``,
    ``[CLS]``, ``[SEP]``, ``[MASK]``; pairs get token_type_ids 1), RoBERTa and
    XLM-R a byte-level BPE tokenizer with RoBERTa's post-processor (``<s>`` 0,
    ``<pad>`` 1 = ``padding_idx``, ``</s>`` 2). ``max_position_embeddings`` is
    the config's value (default 512 for BERT, 514 for RoBERTa / XLM-R, whose
    positions start at ``padding_idx + 1``).

    ``sentence_transformers``: ``False``, or a pooling mode (``"mean"``,
    ``"cls"``, ``"lasttoken"``, ``"max"``, ...; ``True`` means ``"mean"``) to
    also write a sentence-transformers folder (``modules.json``,
    ``1_Pooling/config.json``, ``2_Normalize`` when ``normalize``,
    ``sentence_bert_config.json`` with ``max_seq_length``).
    ``config_overrides`` go to the transformers config class as they are
    (e.g. ``hidden_act``, ``layer_norm_eps``, ``id2label``).
    """
    import torch
    import transformers

    from patchbay_plugins.models.sentence_transformers import write_sentence_transformers_files

    if arch not in ENCODER_ARCHITECTURES:
        raise ValueError(f"unknown encoder arch {arch!r}; known: {sorted(ENCODER_ARCHITECTURES)}")
    config_name, family = ENCODER_ARCHITECTURES[arch]
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model*.safetensors"), directory / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)

    if family == "bert":
        pad_id = BERT_SPECIAL_TOKENS.index("[PAD]")
        max_pos = max_position_embeddings or 512
        usable = max_pos
        kwargs: dict[str, Any] = dict(pad_token_id=pad_id, type_vocab_size=2, layer_norm_eps=1e-12)
    else:
        pad_id = ROBERTA_SPECIAL_TOKENS.index("<pad>")
        max_pos = max_position_embeddings or 514
        usable = max_pos - pad_id - 1
        kwargs = dict(
            pad_token_id=pad_id,
            bos_token_id=ROBERTA_SPECIAL_TOKENS.index("<s>"),
            eos_token_id=ROBERTA_SPECIAL_TOKENS.index("</s>"),
            type_vocab_size=1,
            layer_norm_eps=1e-5,
        )
    kwargs.update(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_pos,
        hidden_act="gelu",
        initializer_range=round(hidden_size**-0.5, 6),
    )
    if arch.endswith("ForSequenceClassification"):
        kwargs["num_labels"] = num_labels
    kwargs.update(config_overrides)
    config = getattr(transformers, config_name)(**kwargs)
    config.architectures = [arch]
    config.dtype = torch_dtype

    state = _random_encoder_state_dict(config, arch, seed, torch_dtype)
    config.save_pretrained(str(directory))
    _save_weights(directory, state, shards)
    _save_encoder_tokenizer(directory, family, vocab_size, usable)
    if sentence_transformers:
        mode = "mean" if sentence_transformers is True else str(sentence_transformers)
        write_sentence_transformers_files(
            directory, hidden_size, mode, normalize=normalize, max_seq_length=max_seq_length, legacy_keys=st_legacy_keys
        )
    return directory


# --------------------------------------------------------------------------- cache


def _source_fingerprint() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(_CORPUS_FILE.read_bytes())
    return h.hexdigest()


def cache_key(name: str, builder_kwargs: dict[str, Any] | None, builder: Callable[..., Any] | None = None) -> str:
    """``<name>-<hash>``: the hash covers the arguments, the builder, its source and library versions."""
    import tokenizers
    import transformers

    extra = {} if builder is None or builder is build_tiny_model else {"builder_fn": builder.__qualname__}
    payload = json.dumps(
        {
            "name": name,
            "kwargs": builder_kwargs or {},
            **extra,
            "builder": BUILDER_VERSION,
            "source": _source_fingerprint(),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        sort_keys=True,
        default=repr,
    )
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def default_cache_root() -> Path:
    """``$PATCHBAY_CACHE_DIR/models``, by default ``~/.cache/patchbay/models``."""
    return Path(os.environ.get("PATCHBAY_CACHE_DIR") or Path.home() / ".cache" / "patchbay") / "models"


def cached_model(
    name: str,
    builder_kwargs: dict[str, Any] | None = None,
    *,
    cache_root: str | os.PathLike | None = None,
    builder: Callable[..., Path] | None = None,
) -> Path:
    """Build ``builder(dir, **builder_kwargs)`` once into the cache and return its directory.

    ``builder`` defaults to :func:`build_tiny_model`; pass e.g.
    :func:`build_tiny_encoder` (or use :func:`cached_encoder`). The build goes
    to a temporary sibling directory that is renamed into place, so a
    directory under its final name is always complete; concurrent builders
    race harmlessly (the loser's copy is discarded).
    """
    builder = builder or build_tiny_model
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / cache_key(name, builder_kwargs, builder)
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        builder(tmp, **(builder_kwargs or {}))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_encoder(
    name: str, builder_kwargs: dict[str, Any] | None = None, *, cache_root: str | os.PathLike | None = None
) -> Path:
    """:func:`cached_model` with :func:`build_tiny_encoder` as the builder."""
    return cached_model(name, builder_kwargs, cache_root=cache_root, builder=build_tiny_encoder)


__all__ = [
    "BERT_SPECIAL_TOKENS",
    "DEFAULT_CHAT_TEMPLATE",
    "ENCODER_ARCHITECTURES",
    "ROBERTA_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "benchmark_model_config",
    "build_benchmark_model",
    "build_demo_model",
    "build_tiny_encoder",
    "build_tiny_model",
    "cache_key",
    "cached_encoder",
    "cached_model",
    "demo_model_config",
    "train_tokenizer",
    "wordpiece_vocab",
]
