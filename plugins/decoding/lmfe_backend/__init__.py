"""The ``lm-format-enforcer`` structured-output backend (plugin ``lm-format-enforcer``: JSON schema, regex, choice).

lm-format-enforcer works on characters: its parsers (``JsonSchemaParser``,
``RegexParser``, ``StringParser``/``UnionParser``) say which characters may
come next, and ``TokenEnforcer`` walks a prefix tree of the vocabulary with
them. Its own transformers integration does not import under transformers 5,
so the tokenizer data is built here from the exact token bytes of
:class:`~patchbay.decoding.TokenizerInfo`: every token whose bytes are valid
UTF-8 on their own is a "new word" token whose text is those bytes decoded.
Tokens that are only part of a UTF-8 character (byte-level BPE pieces of
rare characters) are never allowed — this backend cannot emit a character the
vocabulary has no whole token for (documented limit).

Defects of the library fixed here (each has a test) — most in the JSON guard
(:mod:`.guard`); control characters also in :mod:`.vocab`, the internal-error
path in :mod:`.matcher`, the regex cache in :mod:`.compile`:

- EOS inside an unterminated JSON string, or on the library's internal-error
  path: EOS is allowed only when our own JSON lexer is outside any string and
  the parser can end, and an internal error is a dead end (an empty row, which
  the engine reports) instead of "allow EOS";
- raw control characters inside JSON strings: they are removed from the
  alphabet of JSON constraints, from the free-text token cache, and from the
  allowed characters while inside a string;
- integers: ``"-0.5"``, ``"1e-5"`` were allowed for ``"type": "integer"``;
  ``.``/``e``/``E`` are masked while an integer is being written;
- whitespace at the start of a string is not counted (nor shown to the
  ``pattern``): ``" hello"`` passed ``maxLength: 5``; a string with
  ``maxLength`` or a pattern cannot start with a space here;
- ``minLength`` counted an escape sequence (``\\n``) as two characters; no
  escape may start before the minimum length is reached;
- a trailing comma before ``}`` (``{"a": 1,}``) when the object could end:
  no ``}`` or ``]`` right after a comma;
- endless trailing whitespace after the JSON value: the constraint terminates
  when the value is complete;
- a process-wide regex cache shared by every schema (unbounded, and built for
  the first tokenizer's alphabet): each compiled schema gets its own.

``disable_any_whitespace`` is honoured (no whitespace outside strings);
``whitespace_pattern`` is not (a 400 naming it); grammars are not supported.

Modules: :mod:`.vocab` (built once per tokenizer), :mod:`.checks` (the JSON
keyword table; what the tokenizer lets the library write), :mod:`.guard` (the
JSON guard), :mod:`.compile` (what is honoured, and compiling),
:mod:`.matcher` (the compiled constraint and the per-sequence matcher that
fills the bitmask). The library is imported on first use, not when the plugin
loads.
"""

from __future__ import annotations

from typing import Any

from patchbay import hookimpl

from .compile import LmfeBackend


@hookimpl
def register_decoding_backends(register: Any) -> None:
    register(LmfeBackend())


__all__ = ["LmfeBackend", "register_decoding_backends"]
