"""The bases both builtin structured-output backends are built on (no third-party imports at module level)."""

from __future__ import annotations

import uuid
from typing import Any

from patchbay.decoding import CompiledConstraint, ConstraintError, ConstraintSpec, TokenizerInfo

from ._masks import PerTokenizer, VocabMasks
from ._spec import JsonKeywords


class TokenizerData:
    """Base of a backend's data for one served tokenizer: the tokenizer's :class:`~._masks.VocabMasks`.

    Keeps no reference to the ``TokenizerInfo`` itself: the cache holding this is keyed weakly by it.
    """

    def __init__(self, info: TokenizerInfo) -> None:
        self.masks = VocabMasks(info)
        #: names this data's pieces in compile worker processes (:class:`patchbay.isolation.Shared`)
        self.key = uuid.uuid4().hex


class TokenizerBackend:
    """A :class:`~patchbay.decoding.DecodingBackend` that compiles against data built once per tokenizer.

    A subclass names itself (``name``, ``auto_priority``), says what it
    honours (``kinds``, ``json_keywords``; ``unsupported`` may refuse more),
    gives the class of its per-tokenizer data
    (``tokenizer_data``, a :class:`TokenizerData` built once per live
    ``TokenizerInfo``) and compiles a spec it can honour against that data
    (``_compile``). :meth:`compile` refuses what ``unsupported`` names, with the
    same message.
    """

    name: str
    auto_priority: int | None
    #: the constraint kinds it honours
    kinds: frozenset[str]
    #: what it enforces of JSON schema
    json_keywords: JsonKeywords
    tokenizer_data: type[TokenizerData]

    def __init__(self) -> None:
        self._data = PerTokenizer(self.tokenizer_data)

    def unsupported(self, spec: ConstraintSpec) -> str | None:
        if spec.kind not in self.kinds:
            return f"{self.name} does not support constraint kind {spec.kind!r}"
        if spec.kind == "json":
            return self.json_keywords.problem(spec.value, self.name)
        return None

    def compile(self, spec: ConstraintSpec, tokenizer: TokenizerInfo) -> CompiledConstraint:
        why = self.unsupported(spec)
        if why:
            raise ConstraintError(why)
        return self._compile(spec, self._data.get(tokenizer))

    def _compile(self, spec: ConstraintSpec, data: Any) -> CompiledConstraint:
        """Compile ``spec``, which this backend can honour, against the tokenizer's data."""
        raise NotImplementedError
