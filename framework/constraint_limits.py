"""Limits on what a structured-output constraint may ask before any backend compiles it.

A constraint is the client's input: a deep, huge or self-referential schema, a
regex with nested counted repeats or a megabyte grammar would make a compile run
for minutes or exhaust memory. :func:`check_spec` refuses those with a 400 that
names the limit, for every backend alike, and refuses a JSON schema no finite
value satisfies (a ``$ref`` cycle through required properties), which no
backend could honour without producing output that violates it.
"""

from __future__ import annotations

import json
from typing import Any

from patchbay.decoding import ConstraintSpec
from patchbay.errors import bad_request

#: nesting of subschemas
MAX_SCHEMA_DEPTH = 32
#: subschemas in one schema
MAX_SCHEMA_NODES = 5_000
#: the schema's JSON text
MAX_SCHEMA_BYTES = 256 * 1024
#: ``$ref`` occurrences in one schema
MAX_SCHEMA_REFS = 256
#: ``minLength`` / ``maxLength`` / ``minItems`` / ``maxItems`` / ``minProperties`` / ``maxProperties``,
#: and a regex's counted repeats (``{m,n}``, nested ones multiplied)
MAX_REPEAT = 4_096
#: a regex's text, a grammar's text
MAX_REGEX_BYTES = 16 * 1024
MAX_GRAMMAR_BYTES = 128 * 1024
#: choices, and their text together
MAX_CHOICES = 1_024
MAX_CHOICE_BYTES = 128 * 1024

_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def check_spec(spec: ConstraintSpec, param: str) -> None:
    """A 400 naming the limit when ``spec`` is past one (see the module's constants)."""
    if spec.kind == "json":
        check_schema(spec.value, param)
    elif spec.kind == "regex" and isinstance(spec.value, str):
        _limit(len(spec.value.encode()), MAX_REGEX_BYTES, "bytes of regex", param)
        _limit(regex_repeat(spec.value), MAX_REPEAT, "repetitions in the regex (counted repeats, nested ones "
               "multiplied)", param)
    elif spec.kind == "grammar" and isinstance(spec.value, str):
        _limit(len(spec.value.encode()), MAX_GRAMMAR_BYTES, "bytes of grammar", param)
    elif spec.kind == "choice" and isinstance(spec.value, list):
        _limit(len(spec.value), MAX_CHOICES, "choices", param)
        _limit(sum(len(str(c).encode()) for c in spec.value), MAX_CHOICE_BYTES, "bytes of choices", param)
    if spec.whitespace_pattern is not None:
        _limit(len(spec.whitespace_pattern), 256, "characters of whitespace_pattern", param)


def _limit(value: int, limit: int, what: str, param: str) -> None:
    if value > limit:
        raise bad_request(f"The constraint has {value} {what}; the limit is {limit}.", param=param,
                          code="constraint_too_large")


def check_schema(schema: Any, param: str) -> None:
    """Depth, size, ``$ref`` count and repeat counts of a JSON schema (iteratively: no recursion), then
    that some finite value satisfies it."""
    _limit(len(json.dumps(schema, ensure_ascii=False).encode()), MAX_SCHEMA_BYTES, "bytes of JSON schema", param)
    nodes = refs = 0
    stack = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, list):
            stack.extend((item, depth) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        nodes += 1
        _limit(depth, MAX_SCHEMA_DEPTH, "levels of nested subschemas", param)
        _limit(nodes, MAX_SCHEMA_NODES, "subschemas", param)
        if "$ref" in node:
            refs += 1
            _limit(refs, MAX_SCHEMA_REFS, "$ref occurrences", param)
        for key in _COUNTS:
            value = node.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                _limit(value, MAX_REPEAT, f"as {key}", param)
        for key, value in node.items():
            if key in ("enum", "const", "default", "examples"):
                continue
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1))
    if not has_finite_instance(schema):
        raise bad_request("No finite JSON value satisfies this schema (a $ref cycle through required properties "
                          "or array items, or a `false` schema): output could never complete.", param=param,
                          code="invalid_constraint")


def resolve_ref(root: Any, ref: str) -> Any:
    """A local ``$ref`` target (``#``, ``#/$defs/x``, ``#/definitions/x``, any JSON pointer); None otherwise."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def has_finite_instance(schema: Any) -> bool:
    """Whether some finite JSON value can satisfy ``schema``, as far as its structure decides: the least
    fixpoint over its ``$ref`` targets (a target counts as satisfiable only once a finite value has been
    built for it without assuming itself)."""
    known: dict[str, bool] = {}

    def finite(node: Any, depth: int = 0) -> bool:
        if node is False:
            return False
        if not isinstance(node, dict) or depth > MAX_SCHEMA_DEPTH + 2:
            return True
        if "$ref" in node:
            ref = node["$ref"]
            target = resolve_ref(schema, ref)
            if target is not None and not known.get(ref, False):
                return False
        if "const" in node or "enum" in node:
            return True
        if isinstance(node.get("anyOf"), list) and not any(finite(s, depth + 1) for s in node["anyOf"]):
            return False
        if isinstance(node.get("oneOf"), list) and not any(finite(s, depth + 1) for s in node["oneOf"]):
            return False
        if isinstance(node.get("allOf"), list) and not all(finite(s, depth + 1) for s in node["allOf"]):
            return False
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        for name in node.get("required") or ():
            if isinstance(name, str) and name in props and not finite(props[name], depth + 1):
                return False
        min_items = node.get("minItems") or 0
        if isinstance(min_items, int) and min_items > 0:
            prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
            for sub in prefix[:min_items]:
                if not finite(sub, depth + 1):
                    return False
            if min_items > len(prefix) and "items" in node and not finite(node["items"], depth + 1):
                return False
        return True

    refs = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    changed = True
    while changed:
        changed = False
        for ref in refs:
            if not known.get(ref) and resolve_ref(schema, ref) is not None and finite(resolve_ref(schema, ref)):
                known[ref] = True
                changed = True
    return finite(schema)


def regex_repeat(pattern: str) -> int:
    """The largest number of times one piece of ``pattern`` may repeat by counted repeats (``{m,n}``, nested
    ones multiplied; ``*`` and ``+`` count once: they cost a loop, not states). 0 when it does not parse
    (the backend reports that)."""
    import re._constants as C  # noqa: N812
    import re._parser as P  # noqa: N812

    try:
        parsed = P.parse(pattern)
    except Exception:  # noqa: BLE001 - the backend gives the parser's message
        return 0
    worst = 1
    stack = [(parsed, 1)]
    while stack:
        items, factor = stack.pop()
        for op, av in items:
            if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
                lo, hi, sub = av
                count = lo if hi == C.MAXREPEAT else hi
                inner = factor * max(count, 1)
                worst = max(worst, inner)
                stack.append((sub, inner))
            elif op == C.SUBPATTERN:
                stack.append((av[-1], factor))
            elif op == C.BRANCH:
                stack.extend((branch, factor) for branch in av[1])
            elif op in (C.ASSERT, C.ASSERT_NOT):
                stack.append((av[1], factor))
    return worst
