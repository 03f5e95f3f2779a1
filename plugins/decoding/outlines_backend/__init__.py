"""The ``outlines`` structured-output backend (plugin ``outlines``).

- regex, JSON schema and choice: ``outlines_core`` — a ``Vocabulary`` built from
  the exact token bytes, one ``Index`` (token-level DFA) per constraint, one
  ``Guide`` per sequence. JSON schemas become a regex through
  ``outlines_core.json_schema.build_regex_from_schema``;
- grammars (Lark, EBNF / GBNF) and free JSON (``json_object``): ``llguidance``,
  the engine outlines itself uses for grammars — an ``LLTokenizer`` built from
  the same bytes, one ``LLMatcher`` per sequence.

``outlines_core`` turns a schema into a regex and silently drops what a regex
cannot say (numeric bounds, ``uniqueItems``, ``minProperties``, ...). Such a
keyword is refused here by name (a 400), never ignored: every output that
finishes satisfies its schema. The keywords enforced are listed in
:data:`.compile.JSON_KEYWORDS`. Two things are rewritten before outlines_core
sees the schema: each ``pattern`` becomes a regex over the JSON text of the
string (see :func:`.patterns.json_safe_pattern`), and each supported
``format`` becomes our own sound pattern (outlines_core's date regex allows
years beyond 9999 and Unicode digits).

Modules: :mod:`.vocab` (built once per tokenizer), :mod:`.patterns` (regexes),
:mod:`.compile` (what is honoured, and compiling), :mod:`.matchers` (compiled
constraints and the per-sequence matchers that fill the bitmask). The heavy
libraries are imported on first use, not when the plugin loads.
"""

from __future__ import annotations

from typing import Any

from patchbay import hookimpl

from .compile import OutlinesBackend


@hookimpl
def register_decoding_backends(register: Any) -> None:
    register(OutlinesBackend())


__all__ = ["OutlinesBackend", "register_decoding_backends"]
