"""Tool calls and reasoning: what tool-call parsers and reasoning parsers are, for the plugins that ship them.

A **tool-call parser** (registered through ``register_tool_parsers``, chosen with
``--tool-call-parser NAME``) knows one model family's tool-call markup — Hermes'
``<tool_call>{json}</tool_call>``, Llama 3's bare JSON, Mistral's ``[TOOL_CALLS]``,
pythonic ``[f(x=1)]`` — and does two things with it:

- :meth:`ToolParser.parse` reads the calls out of the text generated so far;
- :meth:`ToolParser.grammar` writes the markup down as a Lark grammar (llguidance's
  dialect, with ``%json`` for the arguments) constrained to the request's tools, so
  that ``tool_choice: "required"``, a named function, and ``strict`` tools under
  ``"auto"`` decode in the model's own format and always give valid calls.

A **reasoning parser** (``register_reasoning_parsers``, ``--reasoning-parser NAME``)
splits a reasoning model's thinking (``<think>...</think>``) from its answer.

Both parse *snapshots*: the endpoint calls them with the whole text generated so
far, after every streamed delta and once more with ``final=True`` on the finished
text, and streams the difference between consecutive answers. So an answer for a
longer text must extend the answer for a shorter one: content only grows, a call's
name, once given, never changes, and its ``arguments`` only grow at the end. Text
that may still turn into markup (a half-written ``<tool_ca``) is held back, never
shown as content.

Parsers are plain objects built per served model by their spec's ``factory(tokenizer)``
and shared by every request: keep them stateless. :mod:`patchbay.jsonprefix` scans
JSON that is still being written.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import attrs


@attrs.frozen
class FunctionTool:
    """One function a request offers the model (OpenAI's function tool, as validated by the endpoint)."""

    name: str
    #: the arguments' JSON schema (an object schema; ``{"type": "object", "properties": {}}`` when none was given)
    parameters: dict[str, Any]
    description: str | None = None
    #: the caller asked for arguments that always match ``parameters``
    strict: bool = False


#: JSON as models write it in tool calls: ``{"a": 1, "b": [2, 3]}`` (llguidance's option, ignored elsewhere)
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def calls_schema(tools: Sequence[FunctionTool], *, name_key: str = "name", arguments_key: str = "arguments",
                 compact: bool = True) -> dict[str, Any]:
    """The JSON schema of one call object ``{name_key: "<tool>", arguments_key: {...}}`` to any of ``tools``.

    Each tool's ``parameters`` keeps its meaning: its ``$defs`` (and ``definitions``) move to the root
    under the tool's own prefix and every local ``$ref`` is rewritten to match, so schemas with
    references (pydantic's) can sit side by side. ``compact``: llguidance writes JSON with ``", "`` and
    ``": "`` and no other whitespace (:data:`COMPACT_JSON`).
    """
    defs: dict[str, Any] = {}
    options = []
    for i, tool in enumerate(tools):
        prefix = f"tool{i}"
        params = dict(tool.parameters)
        local = {**params.pop("definitions", {}), **params.pop("$defs", {})}
        for key, sub in local.items():
            defs[f"{prefix}_{key}"] = _rewrite_refs(sub, prefix)
        defs[prefix] = _rewrite_refs(params, prefix)
        options.append({
            "type": "object",
            "properties": {name_key: {"const": tool.name}, arguments_key: {"$ref": f"#/$defs/{prefix}"}},
            "required": [name_key, arguments_key],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = {"anyOf": options, "$defs": defs}
    if compact:
        schema["x-guidance"] = COMPACT_JSON
    return schema


def _rewrite_refs(schema: Any, prefix: str) -> Any:
    """``schema`` with local references pointing at where :func:`calls_schema` moved things."""
    if isinstance(schema, list):
        return [_rewrite_refs(s, prefix) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = _moved_ref(value, prefix)
        elif key in ("enum", "const", "default", "examples"):
            out[key] = value
        else:
            out[key] = _rewrite_refs(value, prefix)
    return out


def _moved_ref(ref: str, prefix: str) -> str:
    for root in ("#/$defs/", "#/definitions/"):
        if ref.startswith(root):
            return f"#/$defs/{prefix}_{ref[len(root):]}"
    return f"#/$defs/{prefix}{ref[1:]}"  # "#" or a pointer into the parameters schema itself


@attrs.frozen
class ParsedCall:
    """One call found in the text so far."""

    #: the function's name; None while it is still being written
    name: str | None
    #: the arguments' JSON text so far (a prefix of the final text while the call is open)
    arguments: str = ""
    #: the call is closed: its arguments are complete JSON
    complete: bool = False


@attrs.frozen
class ToolParse:
    """What a tool-call parser reads from a text: the content before the first call, and the calls."""

    #: text before the first call (the whole text when there is none), with markup never included
    content: str
    calls: tuple[ParsedCall, ...] = ()


@runtime_checkable
class ToolParser(Protocol):
    """A tool-call parser (see the module docstring)."""

    def parse(self, text: str, final: bool) -> ToolParse:
        """The content and calls of ``text``, the model's output so far (``final``: the whole output).

        With ``final`` only complete calls are returned; a call block that is not valid
        JSON is not a call (a parser may then give the whole text back as content).
        """

    def grammar(self, tools: Sequence[FunctionTool], *, allow_text: bool, max_calls: int | None) -> str | None:
        """A Lark grammar (llguidance dialect) of this markup whose calls name one of ``tools`` with arguments
        valid against its ``parameters``; None when the markup cannot be constrained.

        ``allow_text``: free text may come first, and the constraint starts when a call opens
        (``"auto"`` with strict tools); otherwise the output is calls only (``"required"``, a named
        function). ``max_calls``: at most this many calls (None: any number, at least one).
        """


@attrs.frozen
class ReasoningSplit:
    """A reasoning model's output, split: the thinking and the answer."""

    #: the thinking so far (None: the output has no reasoning section)
    reasoning: str | None
    #: the answer so far
    content: str
    #: the reasoning section is closed (what follows is the answer)
    closed: bool = True


@runtime_checkable
class ReasoningParser(Protocol):
    """A reasoning parser (see the module docstring)."""

    def split(self, text: str, final: bool) -> ReasoningSplit:
        """Split ``text``, the model's output so far (``final``: the whole output)."""

    def reasoning_grammar(self) -> str | None:
        """Lark rules (llguidance dialect) defining the rule ``reasoning``: the reasoning section, end marker
        and the whitespace after it included, so that an output constraint holds the answer only (the
        endpoint writes ``start: reasoning answer``); None: constraints hold the whole output."""
