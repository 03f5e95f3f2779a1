"""What the lm-format-enforcer backend honours, and compiling a spec into its parsers: the JSON-schema parser
(behind the :class:`~.guard.JsonGuard`, with its own regex cache), a regex parser, or a union of strings."""

from __future__ import annotations

from typing import Any

from patchbay.decoding import ConstraintError, ConstraintSpec
from patchbay.isolation import WorkerDied, WorkerTimeout

from .._backend import TokenizerBackend
from .._spec import choice_values, formats_to_patterns, load_schema, regex_value
from .checks import JSON_KEYWORDS, regex_parser, strip_anchors, tokenizer_automaton, writable_problem
from .guard import JsonGuard
from .matcher import LmfeConstraint
from .vocab import NAME, LmfeTokenizerData


class LmfeBackend(TokenizerBackend):
    name = NAME
    #: ``auto`` tries lm-format-enforcer after outlines (10)
    auto_priority = 20
    kinds = frozenset({"json", "json_object", "regex", "choice"})
    json_keywords = JSON_KEYWORDS
    tokenizer_data = LmfeTokenizerData

    def unsupported(self, spec: ConstraintSpec) -> str | None:
        if spec.kind == "grammar":
            return f"{NAME} does not support grammar constraints (Lark / EBNF / GBNF); use the outlines backend"
        if spec.kind in ("json", "json_object") and spec.whitespace_pattern is not None and not spec.disable_any_whitespace:
            return f"{NAME} does not support whitespace_pattern (disable_any_whitespace is supported)"
        return super().unsupported(spec)

    def _compile(self, spec: ConstraintSpec, data: LmfeTokenizerData) -> LmfeConstraint:
        from lmformatenforcer import CharacterLevelParserConfig

        if spec.kind in ("json", "json_object"):
            schema = load_schema(spec.value) if spec.kind == "json" else {"type": "object"}
            schema = formats_to_patterns(schema)
            automata: dict[str, Any] = {}
            why = writable_problem(schema, data, automata)
            if why:
                raise ConstraintError(why)
            config = CharacterLevelParserConfig(
                alphabet=data.json_alphabet, max_consecutive_whitespaces=12, force_json_field_order=False,
                max_json_array_length=20,
            )
            root = JsonGuard(self._json_parser(schema, config, automata), no_ws=spec.disable_any_whitespace)
            return LmfeConstraint(root, config, data)
        config = CharacterLevelParserConfig(alphabet=data.alphabet)
        if spec.kind == "regex":
            pattern = regex_value(spec.value)
            try:
                why, fsm = tokenizer_automaton(pattern, data, "")
                root = regex_parser(fsm, config)
            except (WorkerTimeout, WorkerDied):
                raise
            except Exception as e:  # noqa: BLE001 - interegular raises several types
                raise ConstraintError(f"invalid regex for {NAME}: {type(e).__name__}: {e}") from None
            if why:
                raise ConstraintError(f"{NAME} cannot enforce this regex: {why}")
            return LmfeConstraint(root, config, data)
        # choice
        from lmformatenforcer import StringParser, UnionParser

        choices = choice_values(spec.value)
        missing = sorted({c for choice in choices for c in choice if c not in data.singles})
        if missing:
            raise ConstraintError(
                f"{NAME} cannot produce the characters {''.join(missing)!r} with this tokenizer (no token is just "
                "that character); use the outlines backend"
            )
        return LmfeConstraint(UnionParser([StringParser(c) for c in dict.fromkeys(choices)]), config, data)

    @staticmethod
    def _json_parser(schema: dict, config: Any, automata: dict[str, Any]) -> Any:
        from lmformatenforcer import JsonSchemaParser
        from lmformatenforcer.external.jsonschemaobject import JsonSchemaObject

        context = JsonSchemaParser._Context()
        try:
            context.model_class = JsonSchemaObject(**schema)
        except Exception as e:  # noqa: BLE001 - pydantic validation of the schema
            raise ConstraintError(f"{NAME}: cannot read the JSON schema: {e}") from None
        context.alphabet_without_quotes = config.alphabet.replace('"', "")
        # per schema, not the library's process-wide dict; holding every pattern's parser already, so the engine
        # thread never builds an automaton (lm-format-enforcer's key: the pattern without one ^ and one $)
        context.regex_parser_cache = {}
        for pattern, fsm in automata.items():
            key = pattern[1:] if pattern.startswith("^") else pattern
            key = key[:-1] if key.endswith("$") else key
            if key == strip_anchors(pattern):  # the automaton built is the one lm-format-enforcer would build
                context.regex_parser_cache[key] = regex_parser(fsm, config)
        context.active_parser = None
        try:
            parser = JsonSchemaParser(context, config)
        except Exception as e:  # noqa: BLE001
            raise ConstraintError(f"{NAME}: cannot compile the JSON schema: {e}") from None
        context.active_parser = parser
        return parser
