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
- :func:`cached_model` builds once into ``~/.cache/patchbay/models`` and reuses.

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
from typing import Any

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
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(SPECIAL_TOKENS) + len(alphabet)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} for a byte-level tokenizer, got {vocab_size}")
    corpus = [_CORPUS_FILE.read_text(encoding="utf-8")]
    if vocab_size > 1024:
        corpus += _generated_text(3 * vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
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


# --------------------------------------------------------------------------- cache


def _source_fingerprint() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(_CORPUS_FILE.read_bytes())
    return h.hexdigest()


def cache_key(name: str, builder_kwargs: dict[str, Any] | None) -> str:
    """``<name>-<hash>``: the hash covers the arguments, the builder's source and library versions."""
    import tokenizers
    import transformers

    payload = json.dumps(
        {
            "name": name,
            "kwargs": builder_kwargs or {},
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


def cached_model(name: str, builder_kwargs: dict[str, Any] | None = None, *, cache_root: str | os.PathLike | None = None) -> Path:
    """Build ``build_tiny_model(dir, **builder_kwargs)`` once into the cache and return its directory.

    The build goes to a temporary sibling directory that is renamed into place,
    so a directory under its final name is always complete; concurrent builders
    race harmlessly (the loser's copy is discarded).
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / cache_key(name, builder_kwargs)
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build_tiny_model(tmp, **(builder_kwargs or {}))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "benchmark_model_config",
    "build_benchmark_model",
    "build_demo_model",
    "build_tiny_model",
    "cache_key",
    "cached_model",
    "demo_model_config",
    "train_tokenizer",
]
