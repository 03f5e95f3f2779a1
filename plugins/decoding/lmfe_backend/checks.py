"""What lm-format-enforcer can enforce: its JSON-schema keyword table, and whether it could get stuck on a
pattern or a string with this tokenizer (it writes one character at a time and never looks ahead)."""

from __future__ import annotations

import copyreg
from typing import Any

from patchbay.isolation import Shared, WorkerDied, WorkerTimeout, isolated

from .._spec import COMMON_KEYWORDS, iter_schemas, refuse
from .vocab import NAME, LmfeTokenizerData

#: what lm-format-enforcer never writes inside a JSON string (quotes and backslashes of a pattern, control chars)
JSON_FORBIDDEN = '"\\' + "".join(map(chr, range(0x20)))


def _safe_text(s: Any) -> bool:
    """A string lm-format-enforcer may emit verbatim inside JSON quotes."""
    return isinstance(s, str) and not any(c in '"\\' or ord(c) < 0x20 for c in s)


def _pattern_problem(sub: dict) -> str | None:
    """Why lm-format-enforcer could get stuck on the pattern whatever the tokenizer (None: it cannot)."""
    try:
        why = isolated(fsm_problem, sub["pattern"], None, None, JSON_FORBIDDEN)
    except (WorkerTimeout, WorkerDied):
        raise
    except Exception as e:  # noqa: BLE001 - interegular raises several types
        return f"its regex engine cannot parse the pattern ({type(e).__name__}: {e})"
    return why.replace("(or, in JSON, quotes", "(here: quotes") if why else None


def _plain_enum(values: list) -> bool:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return numbers or all(_safe_text(v) for v in values)


def _local_def(ref: Any) -> bool:
    ref = str(ref)
    return (ref.startswith("#/$defs/") or ref.startswith("#/definitions/")) and ref.count("/") == 2


#: JSON-schema keywords lm-format-enforcer enforces (annotations aside), and what it refuses
JSON_KEYWORDS = COMMON_KEYWORDS.extended(
    checks={
        "pattern": [_pattern_problem],
        "const": [refuse("only string constants without quotes, backslashes or control characters",
                         lambda sub: not _safe_text(sub["const"]))],
        "enum": [refuse("only enums of plain strings (no quotes, backslashes, control characters) or of numbers",
                        lambda sub: not _plain_enum(sub["enum"]))],
        "properties": [refuse("property names with quotes, backslashes or control characters",
                              lambda sub: not all(_safe_text(k) for k in sub["properties"]))],
        "items": [refuse("items must be one schema (tuples are not supported)",
                         lambda sub: not isinstance(sub["items"], dict))],
        "$ref": [refuse("only references to #/$defs/<name> or #/definitions/<name>",
                        lambda sub: not _local_def(sub["$ref"]))],
    },
)


def strip_anchors(pattern: str) -> str:
    p = pattern[1:] if pattern.startswith("^") else pattern
    return p[:-1] if p.endswith("$") and not p.endswith("\\$") else p


def tokenizer_automaton(pattern: str, data: LmfeTokenizerData, forbidden: str) -> tuple[str | None, Any]:
    """:func:`pattern_automaton` with this tokenizer's characters, in the compile's worker process (the
    automaton may grow exponentially with the pattern: there, time and memory are bounded)."""
    return isolated(pattern_automaton, pattern, Shared(("singles", data.key), data.singles),
                    Shared(("chars", data.key), data.chars), forbidden)


def pattern_automaton(pattern: str, singles: frozenset[str] | None, chars: frozenset[str] | None,
                      forbidden: str) -> tuple[str | None, Any]:
    """``(fsm_problem(...), the pattern's interegular FSM)``, the FSM built once; picklable (interegular's
    ``anything_else`` crosses by name, so it stays the module's singleton)."""
    import interegular
    from interegular.fsm import anything_else

    copyreg.pickle(type(anything_else), lambda _: "anything_else")
    fsm = interegular.parse_pattern(strip_anchors(pattern)).to_fsm()
    return _fsm_problem(fsm, pattern, singles, chars, forbidden), fsm


def regex_parser(fsm: Any, config: Any) -> Any:
    """lm-format-enforcer's ``RegexParser`` over an FSM built already (see :func:`pattern_automaton`)."""
    from lmformatenforcer import RegexParser

    context = RegexParser._Context()
    context.pattern = fsm
    context.state_character_cache = {}
    parser = RegexParser(context, config)
    parser._update_alphabet(config.alphabet)
    return parser


def fsm_problem(
    pattern: str, singles: frozenset[str] | None, chars: frozenset[str] | None, forbidden: str
) -> str | None:
    """Why lm-format-enforcer could get stuck on ``pattern`` with this tokenizer (None: it cannot).

    lm-format-enforcer writes a regex character by character and never looks
    ahead: if a state it can reach (through any character the vocabulary holds,
    ``forbidden`` aside) can only be left through characters no single token
    writes, the sequence dead-ends. So every reachable state must reach an
    accepting one through ``singles`` (minus ``forbidden``). ``None`` pools
    stand for every character.
    """
    import interegular

    return _fsm_problem(interegular.parse_pattern(strip_anchors(pattern)).to_fsm(), pattern, singles, chars,
                        forbidden)


def _fsm_problem(fsm: Any, pattern: str, singles: frozenset[str] | None, chars: frozenset[str] | None,
                 forbidden: str) -> str | None:
    from interegular.fsm import anything_else

    explicit = {sym for sym in fsm.alphabet if sym is not anything_else}

    def usable(pool: frozenset[str] | None) -> set:
        other = pool is None or any(c not in explicit and c not in forbidden for c in pool)
        out = set()
        for t, syms in fsm.alphabet.by_transition.items():
            if any(
                other if sym is anything_else else ((pool is None or sym in pool) and sym not in forbidden)
                for sym in syms
            ):
                out.add(t)
        return out

    reach_t, finish_t = usable(chars), usable(singles)
    seen, todo = {fsm.initial}, [fsm.initial]
    while todo:
        for t, nxt in fsm.map.get(todo.pop(), {}).items():
            if t in reach_t and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    back: dict[Any, list] = {}
    for state, trans in fsm.map.items():
        for t, nxt in trans.items():
            if t in finish_t:
                back.setdefault(nxt, []).append(state)
    done, todo = set(fsm.finals), list(fsm.finals)
    while todo:
        for prev in back.get(todo.pop(), []):
            if prev not in done:
                done.add(prev)
                todo.append(prev)
    if fsm.initial not in done:
        return f"no text this tokenizer can write (one whole-character token at a time) matches {pattern!r}"
    if seen - done:
        return (f"{pattern!r} can reach a point that only characters this tokenizer has no single token for "
                "(or, in JSON, quotes, backslashes and control characters) continue")
    return None


def writable_problem(schema: Any, data: LmfeTokenizerData, automata: dict[str, Any] | None = None) -> str | None:
    """Strings the schema makes lm-format-enforcer write that this tokenizer cannot write; each ``pattern``'s
    FSM goes into ``automata`` (pattern -> FSM)."""
    for path, sub in iter_schemas(schema):
        if not isinstance(sub, dict):
            continue
        texts = [v for v in sub.get("enum", []) if isinstance(v, str)] + list(sub.get("properties") or {})
        if isinstance(sub.get("const"), str):
            texts.append(sub["const"])
        for text in texts:
            missing = sorted(set(text) - data.singles)
            if missing:
                return (f"{NAME} cannot write {text!r} (at {path}) with this tokenizer: no token is just "
                        f"{''.join(missing)!r}")
        if isinstance(sub.get("pattern"), str):
            why, fsm = tokenizer_automaton(sub["pattern"], data, JSON_FORBIDDEN)
            if automata is not None:
                automata[sub["pattern"]] = fsm
            if why:
                return f"{NAME} cannot enforce the pattern at {path}: {why}"
    return None
