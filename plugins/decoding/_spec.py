"""What both structured-output backends check of a request's spec (no third-party imports at module level).

- :func:`load_schema` parses a JSON schema and checks it with ``jsonschema``;
- :class:`JsonKeywords` says, as data, what a backend enforces of JSON schema:
  :data:`COMMON_KEYWORDS` is what both do, each backend extends it with its
  own keywords and refusals; :func:`schema_problem` walks a schema and
  refuses, by name, what the backend cannot enforce;
- :data:`FORMAT_PATTERNS` are the string formats both enforce, as patterns
  (:func:`formats_to_patterns`, built on :func:`rewrite_schema`);
- :func:`regex_value` and :func:`choice_values` check a regex's and a choice's value.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator, Mapping

from patchbay.constraint_limits import resolve_ref
from patchbay.decoding import ConstraintError


#: keywords that only annotate (never constrain) a value: every backend may ignore them
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "example", "$schema", "$id", "$comment", "$anchor",
        "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "discriminator",
        "x-guidance",
    }
)
#: keywords holding subschemas: name -> "one" | "list" | "one_or_list" | "map"
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
    return resolve_ref(root, ref) is not None


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


#: one check of a keyword: why the backend refuses it in this subschema, or None
Check = Callable[[dict], str | None]


def refuse(why: str, when: Callable[[dict], bool]) -> Check:
    """A check that refuses its keyword with ``why`` in the subschemas where ``when(subschema)`` holds."""
    return lambda sub: why if when(sub) else None


def not_with(key: str, *others: str) -> Check:
    """A check that refuses ``key`` next to any of ``others`` in the same subschema."""
    return refuse(f"{key} together with {' / '.join(others)}", lambda sub: any(o in sub for o in others))


class JsonKeywords:
    """What a backend enforces of JSON schema, as data.

    ``keywords``: the keywords it enforces (annotations are always fine);
    ``checks``: per keyword, checks that may still refuse it for a particular
    value (each returns why, or None); the first refusal is the one reported.
    """

    def __init__(self, keywords: Iterable[str], checks: Mapping[str, Iterable[Check]]) -> None:
        self.keywords = frozenset(keywords)
        self.checks = {key: tuple(c) for key, c in checks.items()}

    def extended(
        self, keywords: Iterable[str] = (), checks: Mapping[str, Iterable[Check]] | None = None
    ) -> JsonKeywords:
        """These keywords and checks and more; a keyword's added checks run after the ones it has."""
        merged = {key: list(c) for key, c in self.checks.items()}
        for key, c in (checks or {}).items():
            merged.setdefault(key, []).extend(c)
        return JsonKeywords(self.keywords | frozenset(keywords), merged)

    def refusal(self, key: str, sub: dict) -> str | None:
        for check in self.checks.get(key, ()):
            why = check(sub)
            if why:
                return why
        return None

    def problem(self, value: Any, backend: str) -> str | None:
        """What the backend cannot enforce in a request's schema (:func:`schema_problem`).

        None as well when the schema itself is invalid: ``compile()`` reports that, with the validator's message.
        """
        try:
            schema = load_schema(value)
        except ConstraintError:
            return None
        return schema_problem(schema, backend, self)


def schema_problem(schema: Any, backend: str, supported: JsonKeywords) -> str | None:
    """The first thing in ``schema`` the backend cannot enforce, as a sentence naming backend and keyword."""
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
            if key not in supported.keywords:
                return f"{backend} cannot enforce JSON-schema keyword '{key}' (at {path})"
            why = supported.refusal(key, sub)
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
    return None


#: what both backends enforce, and the refusals they share; each backend extends it with its own
COMMON_KEYWORDS = JsonKeywords(
    {
        "type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
        "minLength", "maxLength", "pattern", "format", "anyOf", "allOf", "$ref", "$defs", "definitions",
    },
    {
        "format": [check_format, not_with("format", "pattern", "minLength", "maxLength")],
        "pattern": [not_with("pattern", "minLength", "maxLength")],
        "allOf": [refuse("allOf with more than one subschema", lambda sub: len(sub["allOf"]) != 1)],
        "additionalProperties": [refuse("additionalProperties: false without properties",
                                        lambda sub: sub["additionalProperties"] is False and "properties" not in sub)],
    },
)

#: keywords whose values are JSON values, not subschemas (copied as they are when a schema is rewritten)
_VALUES = ("enum", "const", "default", "examples", "example")


def rewrite_schema(schema: Any, entry: Callable[[str, Any], tuple[str, Any] | None]) -> Any:
    """A copy of ``schema`` in which ``entry(key, value)`` may replace any entry by a ``(key, value)``.

    Values of :data:`_VALUES` keywords are copied as they are; everything else is rewritten recursively.
    """
    if isinstance(schema, list):
        return [rewrite_schema(s, entry) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        new = None if k in _VALUES else entry(k, v)
        if new is not None:
            out[new[0]] = new[1]
        else:
            out[k] = v if k in _VALUES else rewrite_schema(v, entry)
    return out


def formats_to_patterns(schema: Any) -> Any:
    """A copy of ``schema`` where each supported string ``format`` is replaced by its pattern."""

    def entry(k: str, v: Any) -> tuple[str, Any] | None:
        return ("pattern", FORMAT_PATTERNS[v]) if k == "format" and isinstance(v, str) and v in FORMAT_PATTERNS else None

    return rewrite_schema(schema, entry)


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------- regex and choice


def regex_value(value: Any) -> str:
    """A regex constraint's pattern; a :class:`ConstraintError` when it is not a string."""
    if not isinstance(value, str):
        raise ConstraintError("regex: expected a string pattern")
    return value


def choice_values(value: Any) -> list[str]:
    """A choice constraint's options; a :class:`ConstraintError` unless a non-empty list of strings."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) for c in value):
        raise ConstraintError("choice: expected a non-empty list of strings")
    return list(value)
