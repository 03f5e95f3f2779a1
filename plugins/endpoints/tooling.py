"""A request's tools and ``tool_choice``, checked, and what they mean for one generation: what the chat template
is shown, which output constraint (if any) holds the calls, and which parser reads them.

Shared by the chat and responses endpoints; not a plugin itself.

- ``"none"``: nothing is parsed; the text is the content.
- ``"auto"``: the server's ``--tool-call-parser`` reads calls out of the text (a 400 without
  ``--enable-auto-tool-choice``). When tools are ``strict``, the parser's grammar holds every call the
  model opens to the tools' schemas (free text stays free until the call's marker).
- ``"required"`` / a named function: decoding is constrained to calls — in the model's own markup when
  the parser can write it as a grammar, else in the JSON forms of :mod:`patchbay_plugins.tools.jsonform`.

With a ``--reasoning-parser`` that says where its reasoning ends, every constraint holds the answer
only: the model thinks freely first (:func:`after_reasoning`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import attrs

from patchbay.decoding import ConstraintSpec
from patchbay.errors import bad_request
from patchbay.served import ServedModel
from patchbay.tools import FunctionTool
from patchbay_plugins.tools.jsonform import CallList, NamedArguments

#: OpenAI's rule for function names
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MODES = ("none", "auto", "required")


@attrs.define(kw_only=True)
class FunctionDefinition:
    name: str | None = None
    description: str | None = None
    parameters: Any = None
    strict: bool | None = None


@attrs.define(kw_only=True)
class ChatTool:
    """A chat request's tool: ``{"type": "function", "function": {...}}``."""

    type: str
    function: FunctionDefinition | None = None


def function_tool(name: Any, parameters: Any, description: str | None, strict: bool | None, param: str) -> FunctionTool:
    """One function tool, checked; ``param`` is where it sits in the request (``tools[0].function``)."""
    import jsonschema

    if not isinstance(name, str) or not name:
        raise bad_request("A function tool needs a name.", param=f"{param}.name")
    if not _NAME.match(name):
        raise bad_request(f"Function name {name!r} must be 1-64 letters, digits, underscores or dashes.",
                          param=f"{param}.name")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad_request(f"The parameters of {name!r} must be a JSON schema object.", param=f"{param}.parameters")
    if parameters.get("type", "object") != "object":
        raise bad_request(f"The parameters of {name!r} must describe an object (type: object).",
                          param=f"{param}.parameters")
    try:
        jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator).check_schema(parameters)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise bad_request(f"The parameters of {name!r} are not a valid JSON schema"
                          f"{' at ' + where if where else ''}: {exc.message}", param=f"{param}.parameters") from None
    missing = _missing_ref(parameters, parameters)
    if missing is not None:
        raise bad_request(f"The parameters of {name!r} refer to {missing!r}, which they do not define.",
                          param=f"{param}.parameters")
    return FunctionTool(name=name, parameters=parameters, description=description, strict=bool(strict))


def _missing_ref(node: Any, root: dict[str, Any]) -> str | None:
    """The first local ``$ref`` (``#/...``) of a schema that points at nothing, or None."""
    if isinstance(node, list):
        return next((m for m in (_missing_ref(v, root) for v in node) if m is not None), None)
    if not isinstance(node, dict):
        return None
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                return ref
    return next((m for m in (_missing_ref(v, root) for k, v in node.items() if k not in ("const", "enum", "default",
                                                                                            "examples"))
                 if m is not None), None)


def chat_tools(tools: list[ChatTool] | None, param: str = "tools") -> tuple[FunctionTool, ...]:
    """The function tools of a chat request (``tools: []`` is a 400, as OpenAI has it)."""
    if tools is None:
        return ()
    if not tools:
        raise bad_request("tools must not be empty; leave it out to offer none.", param=param)
    out = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise bad_request(f"Tool type {tool.type!r} is not supported; only function tools are.",
                              param=f"{param}[{i}].type")
        if tool.function is None:
            raise bad_request("A function tool needs its function.", param=f"{param}[{i}].function")
        f = tool.function
        out.append(function_tool(f.name, f.parameters, f.description, f.strict, f"{param}[{i}].function"))
    return unique(out, param)


def unique(tools: list[FunctionTool], param: str) -> tuple[FunctionTool, ...]:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise bad_request(f"Two tools are named {tool.name!r}.", param=f"{param}[{i}]")
        seen.add(tool.name)
    return tuple(tools)


def choice_mode(choice: Any, tools: Sequence[FunctionTool], *, flat: bool = False,
                param: str = "tool_choice") -> tuple[str, str | None]:
    """``(mode, function name)`` of a ``tool_choice``: ``none`` / ``auto`` / ``required`` / ``named``.

    ``flat``: the Responses API's ``{"type": "function", "name": ...}`` instead of chat's
    ``{"type": "function", "function": {"name": ...}}``.
    """
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in MODES:
            raise bad_request(f"Unknown tool_choice {choice!r}; use none, auto, required or a function.", param=param)
        mode, name = choice, None
    elif isinstance(choice, dict):
        if choice.get("type") != "function":
            raise bad_request(f"tool_choice of type {choice.get('type')!r} is not supported; name a function "
                              "tool with type: function.", param=param)
        holder = choice if flat else choice.get("function")
        name = holder.get("name") if isinstance(holder, dict) else None
        extra = set(choice) - ({"type", "name"} if flat else {"type", "function"})
        if not isinstance(name, str) or not name or extra:
            shape = '{"type": "function", "name": ...}' if flat else '{"type": "function", "function": {"name": ...}}'
            raise bad_request(f"A named tool_choice is {shape}.", param=param)
        mode = "named"
    else:
        raise bad_request("tool_choice must be a string or an object.", param=param)
    if mode in ("required", "named") and not tools:
        raise bad_request(f"tool_choice {mode if mode != 'named' else repr(name)} needs tools.", param=param)
    if mode == "named" and name not in {t.name for t in tools}:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools.", param=param)
    return mode, name


@attrs.frozen
class ToolPlan:
    """What a request's tools mean for one generation."""

    mode: str
    tools: tuple[FunctionTool, ...] = ()
    #: the tools as the chat template gets them (None: not shown)
    render: list[dict[str, Any]] | None = None
    #: decoding constraint of the calls (None: none)
    constraint: ConstraintSpec | None = None
    #: reads the calls out of the text (None: no parsing)
    reader: Any = None
    #: at most this many calls are returned (None: all)
    max_calls: int | None = None
    #: the named function (mode "named")
    name: str | None = None


def plan_tools(model: ServedModel, tools: tuple[FunctionTool, ...], choice: Any, parallel: bool | None, *,
               flat: bool = False, max_calls: int | None = None, param: str = "tool_choice") -> ToolPlan:
    """The plan of a request's (checked) ``tools``, ``tool_choice`` and ``parallel_tool_calls``."""
    mode, name = choice_mode(choice, tools, flat=flat, param=param)
    if not tools:
        return ToolPlan("none")
    if parallel is False:
        max_calls = 1
    render = [template_tool(t) for t in tools] or None
    if mode == "none":
        hide = model.config.exclude_tools_when_tool_choice_none
        return ToolPlan(mode, tools, None if hide else render)
    parser = model.tool_parser
    if mode == "auto":
        if not model.config.enable_auto_tool_choice:
            raise bad_request('"auto" tool choice needs a server started with --enable-auto-tool-choice and '
                              "--tool-call-parser NAME.", param=param)
        constraint = None
        if any(t.strict for t in tools):
            loose = [t if t.strict else attrs.evolve(t, parameters={"type": "object"}) for t in tools]
            grammar = parser.grammar(loose, allow_text=True, max_calls=max_calls)
            constraint = None if grammar is None else ConstraintSpec(kind="grammar", value=grammar)
        return ToolPlan(mode, tools, render, constraint, parser, max_calls)
    chosen = [t for t in tools if t.name == name] if mode == "named" else list(tools)
    if mode == "named":
        max_calls = 1
    grammar = parser.grammar(chosen, allow_text=False, max_calls=max_calls) if parser is not None else None
    if grammar is None:  # the calls' own JSON forms
        parser = NamedArguments(name) if mode == "named" else CallList()
        grammar = parser.grammar(chosen, allow_text=False, max_calls=max_calls)
    return ToolPlan(mode, tools, render, ConstraintSpec(kind="grammar", value=grammar), parser, max_calls, name)


def template_tool(tool: FunctionTool) -> dict[str, Any]:
    """A tool as transformers hands it to chat templates (OpenAI's chat shape)."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters
    return {"type": "function", "function": function}


# --------------------------------------------------------------------------- reasoning first


def after_reasoning(model: ServedModel, spec: ConstraintSpec) -> ConstraintSpec:
    """``spec`` holding only the answer after the reasoning section, when the reasoning parser writes that
    section as a grammar (else ``spec`` unchanged: it holds the whole output)."""
    parser = model.reasoning_parser
    rules = parser.reasoning_grammar() if parser is not None else None
    if not rules:
        return spec
    if spec.kind == "grammar":
        answer = _renamed_start(str(spec.value))
    elif spec.kind == "json":
        schema = json.loads(spec.value) if isinstance(spec.value, str) else spec.value
        answer = f"answer: %json {json.dumps(schema)}\n"
    elif spec.kind == "json_object":
        answer = 'answer: %json {"type": "object"}\n'
    elif spec.kind == "choice":
        answer = "answer: " + " | ".join(json.dumps(c) for c in spec.value) + "\n"
    else:  # regex: a lark regex literal
        answer = "answer: /" + str(spec.value).replace("/", "\\/") + "/\n"
    lines = answer.splitlines()
    options = [line for line in lines if line.lstrip().startswith("%llguidance")] or ["%llguidance {}"]
    rest = [line for line in lines if not line.lstrip().startswith("%llguidance")]
    text = "\n".join([*options, "start: reasoning answer", rules.strip(), *rest]) + "\n"
    return attrs.evolve(spec, kind="grammar", value=text)


def _renamed_start(grammar: str) -> str:
    """A Lark grammar whose ``start`` rule is called ``answer``."""
    return re.sub(r"(?m)^(\s*)start(\s*(?:\[[^\]\n]*\])?\s*:)", r"\1answer\2", grammar)


async def compile_output_constraint(model: ServedModel, req: Any, plan: ToolPlan) -> Any:
    """The compiled constraint of a request: its own (``response_format``, ``structured_outputs``, ...) or its
    tools' — not both — held after the reasoning section when there is one. None: unconstrained."""
    own = req.constraint_request(model)
    if own is not None and plan.constraint is not None:
        why = "strict tools" if plan.mode == "auto" else f'tool_choice "{plan.mode}"'
        raise bad_request(f"{own[2]} cannot be combined with {why}: the calls are constrained already.",
                          param=own[2])
    if own is not None:
        spec, backend, param = own
    elif plan.constraint is not None:
        if getattr(req, "use_beam_search", False):
            raise bad_request("use_beam_search cannot be combined with constrained tool calls.",
                              param="use_beam_search")
        spec, backend, param = plan.constraint, None, "tools"
    else:
        return None
    return await model.constraints.compile(after_reasoning(model, spec), backend, param)
