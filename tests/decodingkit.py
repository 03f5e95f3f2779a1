"""Helpers for structured-output backend tests: random walks through a matcher, output validators.

A *walk* plays the engine's part without a model: it asks the matcher for its
bitmask row, checks the row (never empty, never a special token other than
EOS), samples an allowed token with a seeded ``random.Random`` (biased towards
EOS and towards JSON punctuation so that walks finish), feeds it back, and
stops at EOS, at ``is_terminated()`` or at a step limit. The caller validates
the bytes of every walk that finished.

``python tests/decodingkit.py`` measures compile times and per-step costs of
both backends (see :func:`main`).
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from patchbay.decoding import ConstraintSpec, TokenizerInfo

_PUNCT = b'"}],:'


@dataclass
class Walk:
    text: bytes
    end: str  # "eos" | "terminated" | "limit"
    steps: int
    tokens: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.end in ("eos", "terminated")

    def str(self) -> str:
        return self.text.decode("utf-8")  # strict: a finished output is valid UTF-8


class VocabView:
    """Per-tokenizer arrays the walker uses (built once per TokenizerInfo)."""

    def __init__(self, info: TokenizerInfo) -> None:
        self.info = info
        V = info.vocab_size  # noqa: N806
        self.words = (V + 31) // 32
        self.eos = np.zeros(V, dtype=bool)
        self.eos[list(info.eos_token_ids)] = True
        self.regular = np.array([bool(b) for b in info.token_bytes], dtype=bool)
        self.punct = np.array([bool(b) and any(c in b for c in _PUNCT) for b in info.token_bytes], dtype=bool)

    def unpack(self, row: torch.Tensor) -> np.ndarray:
        bits = np.unpackbits(row.numpy().astype("<i4").view(np.uint8), bitorder="little")[: self.info.vocab_size]
        return bits.astype(bool)


def walk(
    compiled: Any,
    view: VocabView,
    seed: int,
    *,
    max_steps: int = 200,
    eos_p: float = 0.5,
    punct_p: float = 0.4,
    check_row: bool = True,
) -> Walk:
    rng = random.Random(seed)
    m = compiled.matcher()
    bitmask = torch.zeros((2, view.words), dtype=torch.int32)
    out: list[int] = []
    end = "limit"
    for step in range(max_steps):
        bitmask.zero_()
        m.fill_bitmask(bitmask, 1)
        allowed = view.unpack(bitmask[1])
        if check_row:
            assert not bitmask[0].any(), "fill_bitmask wrote outside its row"
            assert allowed.any(), f"dead end after {bytes_of(view, out)!r}"
            bad = allowed & ~view.regular & ~view.eos
            assert not bad.any(), f"special/unknown ids allowed: {np.flatnonzero(bad)[:10]}"
        eos_ok = bool((allowed & view.eos).any())
        others = allowed & ~view.eos
        if eos_ok and (not others.any() or rng.random() < eos_p):
            end = "eos"
            break
        punct = others & view.punct
        pool = np.flatnonzero(punct if punct.any() and rng.random() < punct_p else others)
        tok = int(pool[rng.randrange(len(pool))])
        assert m.advance(tok), f"advance refused the allowed token {tok} after {bytes_of(view, out)!r}"
        out.append(tok)
        if m.is_terminated():
            bitmask.zero_()
            m.fill_bitmask(bitmask, 1)
            allowed = view.unpack(bitmask[1])
            assert allowed.any() and not (allowed & ~view.eos).any(), "terminated but non-EOS tokens allowed"
            end = "terminated"
            break
    return Walk(bytes_of(view, out), end, len(out), out)


def bytes_of(view: VocabView, ids: list[int]) -> bytes:
    return b"".join(view.info.token_bytes[i] or b"" for i in ids)


def walks(compiled: Any, view: VocabView, seeds: range | list[int], **kw: Any) -> list[Walk]:
    return [walk(compiled, view, s, **kw) for s in seeds]


# --------------------------------------------------------------------------- validators


def json_validator(schema: dict) -> Any:
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_json(text: str, schema: dict | None) -> Any:
    value = json.loads(text)  # strict: raw control characters in strings fail here
    if schema is not None:
        json_validator(schema).validate(value)
    return value


#: a JSON string, or an unterminated one at the very end of the text (group 1 empty)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*("|\\?\Z)', re.DOTALL)


def outside_strings(text: str) -> tuple[str, bool]:
    """The text outside JSON strings, and whether ``text`` ends inside one (a lexer of the tests' own)."""
    pieces, pos, inside = [], 0, False
    for m in _JSON_STRING.finditer(text):
        pieces.append(text[pos : m.start()])
        pos, inside = m.end(), m.group(1) != '"'
    pieces.append(text[pos:])
    return "".join(pieces), inside


def whitespace_outside_strings(text: str) -> str:
    """All whitespace characters outside JSON strings, in order."""
    return "".join(c for c in outside_strings(text)[0] if c in " \t\n\r")


def check_regex(text: str, pattern: str) -> None:
    assert re.fullmatch(pattern, text), f"{text!r} does not match {pattern!r}"


def finished_fraction(ws: list[Walk]) -> float:
    return sum(w.finished for w in ws) / max(len(ws), 1)


# --------------------------------------------------------------------------- tokenizers for tests


def metaspace_tokenizer() -> Any:
    """A SentencePiece-style tokenizer (Metaspace ``▁``, ``<0xNN>`` byte fallback as regular vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Hello world, this is a test of the metaspace tokenizer.\n\tTabs and new lines here."] * 10
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                         show_progress=False))
    learned = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# --------------------------------------------------------------------------- measurements


FIVE_FIELDS = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "active"],
    "additionalProperties": False,
}


def nested_pydantic_schema() -> dict:
    """A nested Pydantic model as ``client.chat.completions.parse`` sends it (strict)."""
    import enum
    from typing import Literal, Optional

    from pydantic import BaseModel, Field

    try:
        from openai.lib._pydantic import to_strict_json_schema
    except ImportError:  # what the openai client does, in short: every object strict, every property required
        def to_strict_json_schema(model: Any) -> dict:
            def strict(node: Any) -> Any:
                if isinstance(node, dict):
                    node = {k: strict(v) for k, v in node.items()}
                    if node.get("type") == "object" and "properties" in node:
                        node["additionalProperties"] = False
                        node["required"] = list(node["properties"])
                    node.pop("default", None) if "anyOf" in node else None
                    return node
                return [strict(v) for v in node] if isinstance(node, list) else node

            return strict(model.model_json_schema())

    class Color(str, enum.Enum):
        red = "red"
        green = "green"
        blue = "blue"

    class Address(BaseModel):
        street: str = Field(max_length=24)
        zip: str = Field(pattern=r"^[0-9]{5}$")

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        name: str

    class Person(BaseModel):
        name: str = Field(min_length=1, max_length=16)
        age: int
        color: Color
        address: Address
        previous: Optional[Address] = None
        pets: list[Pet] = Field(max_length=2)
        score: float

    return to_strict_json_schema(Person)


def _time(fn: Any, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:  # pragma: no cover - a measurement script
    """Compile time and per-step cost of both backends on the vocab-4096 and the 8000-vocab tokenizers."""
    import os
    from pathlib import Path

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model
    from patchbay.tokenizer_info import build_tokenizer_info
    from patchbay_plugins.decoding.lmfe_backend import LmfeBackend
    from patchbay_plugins.decoding.outlines_backend import OutlinesBackend

    test_cache = Path(os.environ.get("PATCHBAY_TEST_CACHE") or Path.home() / ".cache" / "patchbay-tests") / "models"
    dirs = {
        "vocab-4096": cached_model("tiny-llama", {"arch": "LlamaForCausalLM", "vocab_size": 4096}, cache_root=test_cache),
        "bench-8000": cached_model("bench-llama-float32", benchmark_model_config("float32")),
    }
    schemas = {"5-field": FIVE_FIELDS, "nested-pydantic": nested_pydantic_schema()}
    others = {
        "regex": ConstraintSpec("regex", r"[a-z]{1,12}@[a-z]{1,8}\.(com|org)"),
        "choice": ConstraintSpec("choice", ["yes", "no", "maybe"]),
        "json_object": ConstraintSpec("json_object"),
        "grammar": ConstraintSpec("grammar", 'start: expr\nexpr: NUM ("+" NUM)*\nNUM: /[0-9]+/'),
    }
    for tname, d in dirs.items():
        hf = AutoTokenizer.from_pretrained(d)
        t = time.perf_counter()
        info = build_tokenizer_info(hf, len(hf), [hf.eos_token_id])
        print(f"{tname}: build_tokenizer_info {1000 * (time.perf_counter() - t):.1f} ms")
        view = VocabView(info)
        for backend in (OutlinesBackend(), LmfeBackend()):
            for kname, spec in others.items():
                if backend.unsupported(spec):
                    continue
                t = time.perf_counter()
                backend.compile(spec, info)
                first = time.perf_counter() - t
                print(f"  {backend.name} {kname}: compile {1000 * first:.0f} ms (first, with per-tokenizer setup), "
                      f"{1000 * _time(lambda: backend.compile(spec, info)):.1f} ms (again)")
        for backend in (OutlinesBackend(), LmfeBackend()):
            backend.compile(ConstraintSpec("regex", "a"), info)  # per-tokenizer data, built once
            for sname, schema in schemas.items():
                spec = ConstraintSpec("json", schema)
                ct = _time(lambda: backend.compile(spec, info), repeat=2)
                compiled = backend.compile(spec, info)
                steps, secs = 0, 0.0
                for seed in range(20):
                    t = time.perf_counter()
                    w = walk(compiled, view, seed, max_steps=300, check_row=False)
                    secs += time.perf_counter() - t
                    steps += w.steps + 1
                print(f"  {backend.name} {sname}: compile {1000 * ct:.0f} ms, "
                      f"walk {1e6 * secs / steps:.0f} us/step (fill_bitmask + advance + walker) over {steps} steps")
                w = max((walk(compiled, view, s, max_steps=300, check_row=False) for s in range(5)),
                        key=lambda w: w.steps)
                m = compiled.matcher()
                bm = torch.zeros((1, view.words), dtype=torch.int32)
                n, t = 0, time.perf_counter()
                for tok in w.tokens:
                    bm.zero_()
                    m.fill_bitmask(bm, 0)
                    m.advance(tok)
                    n += 1
                dt = time.perf_counter() - t
                print(f"      replay of {n} tokens: {1e6 * dt / max(n, 1):.0f} us/step (fill_bitmask + advance only)")


if __name__ == "__main__":  # pragma: no cover
    main()
