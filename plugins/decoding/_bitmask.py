"""Helpers shared by the structured-output backends (no third-party imports at module level).

- :class:`VocabMasks`: per-tokenizer packed masks (regular tokens, EOS) and the
  one step every matcher ends ``fill_bitmask`` with (:meth:`VocabMasks.finish_row`):
  never a special or unknown id, EOS exactly when the output is complete;
- :func:`pack_ids`: token ids -> one packed int32 row;
- :class:`PerTokenizer`: a small per-backend cache of tokenizer-derived
  structures, keyed weakly by the :class:`~patchbay.decoding.TokenizerInfo`;
- the JSON-schema keyword walker both backends use to refuse, by name, the
  keywords they cannot enforce (:func:`schema_problem`), and
  :func:`load_schema` which parses and checks a schema with ``jsonschema``.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from patchbay.decoding import ConstraintError, TokenizerInfo

# --------------------------------------------------------------------------- masks


def words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def pack_ids(ids: Iterable[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids -> int32 ``[ceil(V / 32)]`` with bit ``j`` of word ``w`` set for token ``32 * w + j``."""
    n = words(vocab_size)
    flags = np.zeros(n * 32, dtype=np.bool_)
    arr = ids if isinstance(ids, np.ndarray) else np.fromiter(ids, dtype=np.int64)
    if arr.size:
        flags[arr] = True
    return np.packbits(flags, bitorder="little").view("<i4").astype(np.int32, copy=False)


def row_view(bitmask: Any, row: int) -> np.ndarray:
    """``bitmask[row]`` of a CPU int32 torch tensor (or numpy array) as a writable numpy view."""
    r = bitmask[row]
    if hasattr(r, "numpy"):
        if r.device.type != "cpu":
            raise ValueError("fill_bitmask needs a CPU bitmask")
        r = r.numpy()
    if r.dtype != np.int32 or not r.flags["C_CONTIGUOUS"]:
        raise ValueError("fill_bitmask needs a contiguous int32 bitmask")
    return r


class VocabMasks:
    """Masks derived once from a :class:`TokenizerInfo`."""

    def __init__(self, info: TokenizerInfo) -> None:
        # no reference to ``info`` itself: per-tokenizer caches are keyed weakly by it
        self.token_bytes = info.token_bytes
        self.vocab_size = info.vocab_size
        self.eos_ids = tuple(i for i in info.eos_token_ids if 0 <= i < info.vocab_size)
        eos = set(self.eos_ids)
        regular = [i for i, b in enumerate(info.token_bytes) if b and i not in eos]
        #: tokens that produce text (not special, not unknown, not empty)
        self.regular = pack_ids(regular, info.vocab_size)
        self.eos = pack_ids(self.eos_ids, info.vocab_size)
        self.not_eos = ~self.eos
        self.regular_ids = np.asarray(regular, dtype=np.int64)

    def is_text(self, token_id: int) -> bool:
        """A token that produces text (what a matcher may consume; EOS and specials are not)."""
        return 0 <= token_id < self.vocab_size and bool(self.token_bytes[token_id]) and token_id not in self.eos_ids

    def finish_row(self, row: np.ndarray, complete: bool) -> None:
        """Keep only text tokens in ``row``; then allow EOS exactly when ``complete``."""
        np.bitwise_and(row, self.regular, out=row)
        if complete:
            np.bitwise_or(row, self.eos, out=row)

    def only_eos(self, row: np.ndarray) -> bool:
        return not np.any(row & self.not_eos)


class PerTokenizer:
    """``get(info)`` builds ``factory(info)`` once per live :class:`TokenizerInfo` (weakly keyed, thread-safe)."""

    def __init__(self, factory: Callable[[TokenizerInfo], Any]) -> None:
        self._factory = factory
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, info: TokenizerInfo) -> Any:
        with self._lock:
            hit = self._cache.get(info)
            if hit is None:
                hit = self._cache[info] = self._factory(info)
            return hit


def require_eos(masks: VocabMasks, backend: str) -> int:
    if masks.eos_ids:
        return masks.eos_ids[0]
    raise ConstraintError(f"{backend}: the served tokenizer has no EOS token id, so no constraint can finish")


# --------------------------------------------------------------------------- JSON schema


#: keywords that only annotate (never constrain) a value: every backend may ignore them
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "example", "$schema", "$id", "$comment", "$anchor",
        "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "discriminator",
        "x-guidance",
    }
)
#: keywords holding subschemas: name -> "one" | "list" | "map"
_SUBSCHEMAS = {
    "properties": "map", "patternProperties": "map", "$defs": "map", "definitions": "map",
    "dependentSchemas": "map", "additionalProperties": "one", "items": "one_or_list", "prefixItems": "list",
    "anyOf": "list", "oneOf": "list", "allOf": "list", "not": "one", "if": "one", "then": "one", "else": "one",
    "contains": "one", "propertyNames": "one", "unevaluatedProperties": "one", "unevaluatedItems": "one",
    "additionalItems": "one",
}


def load_schema(value: Any) -> Any:
    """The schema as a Python object: parses JSON text, then checks it against its metaschema.

    Raises :class:`ConstraintError` with the parser's / validator's message.
    """
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConstraintError(f"invalid JSON schema (not JSON): {e}") from None
    if not isinstance(value, (dict, bool)):
        raise ConstraintError(f"invalid JSON schema: expected an object, got {type(value).__name__}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(value, default=jsonschema.Draft202012Validator).check_schema(value)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ConstraintError(f"invalid JSON schema{' at ' + where if where else ''}: {e.message}") from None
    for path, sub in iter_schemas(value):
        ref = sub.get("$ref") if isinstance(sub, dict) else None
        if isinstance(ref, str) and ref.startswith("#") and not _resolves(value, ref):
            raise ConstraintError(f"invalid JSON schema at {path}: $ref {ref!r} does not resolve")
    return value


def _resolves(root: Any, ref: str) -> bool:
    node = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def iter_schemas(schema: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    """Every (path, subschema) of ``schema``, itself first (dicts and booleans)."""
    yield path, schema
    if not isinstance(schema, dict):
        return
    for key, how in _SUBSCHEMAS.items():
        if key not in schema:
            continue
        sub = schema[key]
        if how == "map" and isinstance(sub, dict):
            for name, s in sub.items():
                yield from iter_schemas(s, f"{path}/{key}/{name}")
        elif how in ("list", "one_or_list") and isinstance(sub, list):
            for i, s in enumerate(sub):
                yield from iter_schemas(s, f"{path}/{key}/{i}")
        elif how in ("one", "one_or_list"):
            yield from iter_schemas(sub, f"{path}/{key}")


def schema_problem(
    schema: Any,
    backend: str,
    supported: frozenset[str],
    check: Callable[[str, dict, str], str | None] | None = None,
) -> str | None:
    """The first thing in ``schema`` the backend cannot enforce, as a sentence naming backend and keyword.

    ``supported``: the keywords the backend enforces (annotations are always
    fine); ``check(keyword, subschema, path)`` may refuse a supported keyword
    for a particular value.
    """
    for path, sub in iter_schemas(schema):
        if isinstance(sub, bool):
            if path.endswith("/additionalProperties"):
                continue
            return f"{backend} cannot enforce a boolean subschema (at {path})"
        constraining = [k for k in sub if k not in ANNOTATIONS and k not in ("$defs", "definitions")]
        for combinator in ("anyOf", "oneOf", "allOf", "$ref", "enum", "const"):
            if combinator in sub:
                others = [k for k in constraining if k != combinator and not (k == "type" and combinator in ("enum", "const"))]
                if others:
                    return (f"{backend} cannot enforce JSON-schema keyword '{others[0]}' next to '{combinator}' "
                            f"(at {path}); move it into the subschemas")
        missing = [r for r in sub.get("required", []) if r not in (sub.get("properties") or {})]
        if missing:
            return f"{backend} cannot enforce JSON-schema keyword 'required' (at {path}): {missing[0]!r} is not in properties"
        for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties")):
            if isinstance(sub.get(lo), int) and isinstance(sub.get(hi), int) and sub[lo] > sub[hi]:
                return f"{backend}: the schema is unsatisfiable at {path} ({lo} > {hi})"
        if isinstance(sub.get("type"), list) and len(constraining) > 1:
            other = next(k for k in constraining if k != "type")
            return f"{backend} cannot enforce JSON-schema keyword '{other}' next to a list of types (at {path})"
        for key in sub:
            if key in ANNOTATIONS:
                continue
            if key not in supported:
                return f"{backend} cannot enforce JSON-schema keyword '{key}' (at {path})"
            if check is not None:
                why = check(key, sub, path)
                if why:
                    return f"{backend} cannot enforce JSON-schema keyword '{key}' (at {path}): {why}"
    return None


_DATE = (
    "[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    "|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: string formats both backends enforce, as a pattern each (sound: every match is a valid value — February
#: stops at the 28th, e-mail addresses are plain ASCII)
FORMAT_PATTERNS = {
    "date": f"^{_DATE}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_DATE}T{_TIME}$",
    "uuid": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    "email": "^[a-z0-9][a-z0-9._+-]{0,31}@[a-z0-9][a-z0-9-]{0,31}(?:\\.[a-z0-9][a-z0-9-]{0,31}){0,2}\\.[a-z]{2,8}$",
    "ipv4": f"^{_OCTET}(?:\\.{_OCTET}){{3}}$",
}


def check_format(sub: dict) -> str | None:
    """Why ``sub["format"]`` cannot be enforced (None: it becomes a pattern)."""
    fmt = sub.get("format")
    if fmt not in FORMAT_PATTERNS:
        return f"format {fmt!r} (supported: {', '.join(sorted(FORMAT_PATTERNS))})"
    if "pattern" in sub or "minLength" in sub or "maxLength" in sub:
        return "format together with pattern / minLength / maxLength"
    return None


def formats_to_patterns(schema: Any) -> Any:
    """A copy of ``schema`` where each supported string ``format`` is replaced by its pattern."""
    if isinstance(schema, list):
        return [formats_to_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("enum", "const", "default", "examples", "example"):
            out[k] = v
        elif k == "format" and isinstance(v, str) and v in FORMAT_PATTERNS:
            out["pattern"] = FORMAT_PATTERNS[v]
        else:
            out[k] = formats_to_patterns(v)
    return out


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
