"""The contract between the engine and structured-output backends (plugins/decoding/).

A request's constraint (:class:`ConstraintSpec`) is compiled once by a backend
into a :class:`CompiledConstraint` (cached by the kernel, LRU, keyed by backend,
kind, spec and tokenizer), off the engine loop and under a time limit. Each
sequence then gets its own :class:`Matcher`. Every engine step, the sampler
asks each constrained sequence's matcher to write its allowed tokens into one
row of a packed bitmask, applies all rows at once, samples, and feeds the
sampled token back with :meth:`Matcher.advance`.

Backends register through the ``register_decoding_backends`` hook; each says
itself where ``auto`` tries it (:attr:`DecodingBackend.auto_priority`): the
kernel knows no backend by name.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import attrs

#: constraint kinds a request can ask for
KINDS = ("json", "json_object", "regex", "choice", "grammar")


class ConstraintError(ValueError):
    """The spec is invalid (bad schema / regex / grammar) or the backend cannot honour it.

    The message is shown to the client in a 400.
    """


@attrs.frozen
class ConstraintSpec:
    """What a request asks the output to match."""

    kind: str
    #: json: the schema (a dict, or JSON text); regex: the pattern; choice: list of strings;
    #: grammar: grammar text (Lark, EBNF/GBNF); json_object: None
    value: Any = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False


@attrs.frozen(eq=False)
class TokenizerInfo:
    """Everything a backend needs about the served tokenizer, built once by the kernel.

    ``token_bytes[i]`` is the exact byte string token ``i`` contributes to the
    output text (byte-level BPE bytes decoded, SentencePiece ``▁`` as a space,
    byte-fallback ``<0xNN>`` as that byte); ``None`` for special tokens and ids
    the tokenizer does not have (ids up to ``vocab_size``, the model's logits
    width, which may exceed the tokenizer's length).
    """

    vocab_size: int
    token_bytes: Sequence[bytes | None]
    eos_token_ids: tuple[int, ...]
    special_ids: frozenset[int]
    #: the Hugging Face tokenizer object (for backends that want it)
    hf_tokenizer: Any = None
    #: a short stable fingerprint of the vocabulary (cache key part)
    fingerprint: str = ""


class Matcher(Protocol):
    """One sequence's position in a compiled constraint."""

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]``.

        ``bitmask`` is an int32 tensor ``[N, ceil(vocab_size / 32)]``; bit ``j``
        of word ``w`` stands for token ``32 * w + j``. The row arrives zeroed.
        EOS ids are allowed exactly when the output so far is complete.
        """

    def advance(self, token_id: int) -> bool:
        """Consume a sampled token; False if it was not allowed (the engine then stops the sequence)."""

    def is_terminated(self) -> bool:
        """True when the constraint is complete and nothing but EOS may follow."""


class CompiledConstraint(Protocol):
    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the constraint."""


class DecodingBackend(Protocol):
    """A structured-output backend (see :mod:`patchbay.structured` for how one is chosen)."""

    #: what a request (``guided_decoding_backend``) or the server default names it by
    name: str
    #: where ``auto`` tries this backend: lower first (ties by name); None: never chosen by ``auto``, only by
    #: name. A backend without the attribute counts as None.
    auto_priority: int | None

    def unsupported(self, spec: ConstraintSpec) -> str | None:
        """``None`` when this backend can honour ``spec``, else why not (named in the 400)."""

    def compile(self, spec: ConstraintSpec, tokenizer: TokenizerInfo) -> CompiledConstraint:
        """Compile ``spec``; raises :class:`ConstraintError` with the parser's message on a bad spec.

        May be slow: the kernel calls it in a worker thread under a time limit.
        """
