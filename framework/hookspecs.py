"""Every hook a patchbay plugin can implement.

Hooks run once, when the app is built (in the app factory, after the plugins
are loaded and before the server listens). They *register* objects; requests
and tokens then call those objects directly, never through ``pm.hook``.

Each registration hook receives a ``register`` callback instead of returning
values, so the kernel owns naming, duplicate detection and validation: a
duplicate name stops start-up with both plugins' names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from patchbay.registry import (
        DecodingBackend,
        DefaultModel,
        LogitsProcessorSpec,
        ModelFamily,
        ReasoningParserSpec,
        ToolParserSpec,
    )

hookspec = pluggy.HookspecMarker("patchbay")


# --------------------------------------------------------------------------- HTTP surface


@hookspec
def register_routes(register: Callable[..., None]) -> None:
    """Add HTTP routes.

    Called once per app build. Call ``register(handler)`` with Litestar route
    handlers (functions decorated with ``@get``/``@post``/...), ``Router``
    instances or ``Controller`` classes. Handlers reach the served model
    through the ``serving`` dependency (a :class:`patchbay.serving.Serving`)
    that the kernel provides to every route. Two routes with the same path and
    method stop start-up.
    """


# --------------------------------------------------------------------------- models


@hookspec
def register_model_families(register: Callable[[ModelFamily], None]) -> None:
    """Add model families.

    Call ``register(ModelFamily(...))`` once per family. The kernel picks the
    family for a model directory by the first name in its ``config.json``
    ``architectures`` list and the task asked for. An architecture claimed
    twice for the same task stops start-up.

    A family names its implementation with ``impl`` (``"native"``: its own
    modelling code; another word, e.g. ``"transformers"``, is what
    ``--model-impl WORD`` chooses). A fallback family that runs architectures
    it cannot list gives ``runs(architecture, task) -> bool``: the kernel asks
    it only when no listed family runs the model (under ``--model-impl auto``),
    fallbacks in registration order; a fallback name registered twice for a
    task stops start-up.
    """


@hookspec(firstresult=True)
def default_model() -> DefaultModel | None:
    """The model ``serve`` serves when it is given none.

    Called once at start-up, in ``serve``'s main process, only when no model was
    given; the first plugin to return a :class:`~patchbay.registry.DefaultModel`
    wins (the builtin ``demo`` plugin answers last). Do not run torch here:
    the main process forks the server's worker afterwards (build in a child
    process instead, as the demo plugin does).
    """


# --------------------------------------------------------------------------- decoding


@hookspec
def register_decoding_backends(register: Callable[[DecodingBackend], None]) -> None:
    """Add structured-output backends (JSON schema, regex, choice, grammar).

    Call ``register(backend)`` with a :class:`patchbay.decoding.DecodingBackend`:
    its ``name`` is what a request or the server's default chooses, its
    ``auto_priority`` where ``auto`` tries it (lower first; None: only by name).
    """


@hookspec
def register_logits_processors(register: Callable[[LogitsProcessorSpec], None]) -> None:
    """Add logits processors that requests may name by qualname.

    Call ``register(LogitsProcessorSpec(qualname, factory))``. A request can
    only name registered qualnames; nothing is ever imported because a request
    named it.
    """


# --------------------------------------------------------------------------- tool calls and reasoning


@hookspec
def register_tool_parsers(register: Callable[[ToolParserSpec], None]) -> None:
    """Add tool-call parsers, chosen by name with ``--tool-call-parser``.

    Call ``register(ToolParserSpec(name, factory))``. At start-up the served model
    builds the chosen parser once with ``factory(tokenizer)``: an object that reads a
    model family's tool-call markup out of its output text and can write that markup
    down as a grammar constrained to a request's tools (see :mod:`patchbay.tools`).
    """


@hookspec
def register_reasoning_parsers(register: Callable[[ReasoningParserSpec], None]) -> None:
    """Add reasoning parsers, chosen by name with ``--reasoning-parser``.

    Call ``register(ReasoningParserSpec(name, factory))``. At start-up the served model
    builds the chosen parser once with ``factory(tokenizer)``: an object that splits a
    reasoning model's thinking from its answer (``reasoning_content`` and ``content``;
    see :mod:`patchbay.tools`).
    """
