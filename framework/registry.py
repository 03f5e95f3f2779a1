"""Registries the registration hooks fill, owned by the kernel.

One :class:`Registries` per app. The ``register`` callbacks handed to the
hooks live here, so naming rules and duplicate detection are in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs

from patchbay.decoding import DecodingBackend
from patchbay.errors import StartupError

if TYPE_CHECKING:
    from patchbay.model import LoadRequest

#: the task words a family may offer (vLLM's)
TASKS = ("generate", "embed", "classify", "score", "transcription")
#: the implementation of a family with its own modelling code; ``--model-impl`` also takes vLLM's word for it
NATIVE = "native"
NATIVE_ALIASES = (NATIVE, "vllm")


@attrs.frozen
class ModelFamily:
    """A model family: which HF architectures it runs, for which tasks, and how to load them.

    ``load(request)`` gets a :class:`patchbay.model.LoadRequest` (folder, config, task, dtype,
    device) and returns a model of the kind the task needs, as :mod:`patchbay.model` writes
    the contract down (checked at start-up).

    ``impl`` says whose modelling code it runs: ``"native"`` (its own), or a word naming another
    implementation that ``--model-impl WORD`` chooses (e.g. ``"transformers"``). A family that
    runs architectures it cannot list — a fallback over another library's modelling code — gives
    ``runs(architecture, task) -> bool`` instead of (or besides) ``architectures``; the kernel asks
    it only when no listed family runs the model.
    """

    name: str
    architectures: tuple[str, ...]
    tasks: frozenset[str]
    load: Callable[[LoadRequest], Any]
    impl: str = NATIVE
    runs: Callable[[str, str], bool] | None = None

    def __attrs_post_init__(self) -> None:
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise StartupError(f"model family {self.name!r}: unknown tasks {sorted(unknown)}; known: {TASKS}")
        if not self.impl or self.impl == "auto" or self.impl in NATIVE_ALIASES[1:]:
            raise StartupError(f"model family {self.name!r}: impl {self.impl!r} is a --model-impl keyword, "
                               f"not an implementation's name")

    def implements(self, impl: str) -> bool:
        """Whether ``--model-impl impl`` may choose it (``auto``: any family)."""
        if impl == "auto":
            return True
        return self.impl == (NATIVE if impl in NATIVE_ALIASES else impl)


@attrs.frozen
class DefaultModel:
    """What the ``default_model`` hook returns: a local model directory and the name to serve it as."""

    path: Path
    name: str
    #: how start-up names it in the log ("the bundled demo model")
    what: str = ""


@attrs.frozen
class LogitsProcessorSpec:
    """A logits processor requests may name by ``qualname``; ``factory(*args, **kwargs)`` builds one."""

    qualname: str
    factory: Callable[..., Any]


@attrs.frozen
class ToolParserSpec:
    """A tool-call parser chosen by ``name`` (``--tool-call-parser``); ``factory(tokenizer)`` builds one
    :class:`patchbay.tools.ToolParser` per served model."""

    name: str
    factory: Callable[..., Any]


@attrs.frozen
class ReasoningParserSpec:
    """A reasoning parser chosen by ``name`` (``--reasoning-parser``); ``factory(tokenizer)`` builds one
    :class:`patchbay.tools.ReasoningParser` per served model."""

    name: str
    factory: Callable[..., Any]


@attrs.define
class Registries:
    """What the registration hooks filled, for one app."""

    routes: list[Any] = attrs.field(factory=list)
    #: (architecture, task) -> family
    model_families: dict[tuple[str, str], ModelFamily] = attrs.field(factory=dict)
    #: families with a ``runs`` test (fallbacks), in registration order
    fallback_families: list[ModelFamily] = attrs.field(factory=list)
    decoding_backends: dict[str, DecodingBackend] = attrs.field(factory=dict)
    logits_processors: dict[str, LogitsProcessorSpec] = attrs.field(factory=dict)
    tool_parsers: dict[str, ToolParserSpec] = attrs.field(factory=dict)
    reasoning_parsers: dict[str, ReasoningParserSpec] = attrs.field(factory=dict)
    #: who registered what: key -> plugin name, for duplicate messages
    owners: dict[Any, str] = attrs.field(factory=dict)

    def _claim(self, key: Any, plugin: str) -> None:
        if key in self.owners:
            raise StartupError(f"{key[0]} {key[1]!r} is registered twice: by {self.owners[key]!r} and by {plugin!r}")
        self.owners[key] = plugin

    def route_registrar(self, plugin: str) -> Callable[[Any], None]:
        def register(handler: Any) -> None:
            self.routes.append((plugin, handler))

        return register

    def family_registrar(self, plugin: str) -> Callable[[ModelFamily], None]:
        def register(family: ModelFamily) -> None:
            for arch in family.architectures:
                for task in family.tasks:
                    self._claim(("architecture", f"{arch}/{task}"), plugin)
                    self.model_families[(arch, task)] = family
            if family.runs is not None:
                for task in sorted(family.tasks):
                    self._claim(("fallback family", f"{family.name}/{task}"), plugin)
                self.fallback_families.append(family)

        return register

    def decoding_registrar(self, plugin: str) -> Callable[[DecodingBackend], None]:
        def register(backend: DecodingBackend) -> None:
            self._claim(("decoding backend", backend.name), plugin)
            self.decoding_backends[backend.name] = backend

        return register

    def logits_processor_registrar(self, plugin: str) -> Callable[[LogitsProcessorSpec], None]:
        def register(spec: LogitsProcessorSpec) -> None:
            self._claim(("logits processor", spec.qualname), plugin)
            self.logits_processors[spec.qualname] = spec

        return register

    def tool_parser_registrar(self, plugin: str) -> Callable[[ToolParserSpec], None]:
        def register(spec: ToolParserSpec) -> None:
            self._claim(("tool parser", spec.name), plugin)
            self.tool_parsers[spec.name] = spec

        return register

    def reasoning_parser_registrar(self, plugin: str) -> Callable[[ReasoningParserSpec], None]:
        def register(spec: ReasoningParserSpec) -> None:
            self._claim(("reasoning parser", spec.name), plugin)
            self.reasoning_parsers[spec.name] = spec

        return register

    def family_for(self, architectures: list[str], task: str, impl: str = "auto") -> ModelFamily | None:
        """The family that runs ``architectures`` for ``task`` under ``--model-impl impl``: a family that
        lists one of them, else the first fallback whose ``runs`` accepts one."""
        for arch in architectures:
            family = self.model_families.get((arch, task))
            if family is not None and family.implements(impl):
                return family
        return self.fallback_for(architectures, task, impl)

    def fallback_for(self, architectures: list[str], task: str, impl: str = "auto",
                     besides: ModelFamily | None = None) -> ModelFamily | None:
        """The first fallback family (other than ``besides``) that runs one of ``architectures`` for ``task``."""
        for family in self.fallback_families:
            if (family is not besides and task in family.tasks and family.implements(impl)
                    and any(family.runs(arch, task) for arch in architectures)):
                return family
        return None

    def tasks_for(self, architectures: list[str], impl: str = "auto") -> list[str]:
        return [t for t in TASKS if self.family_for(architectures, t, impl) is not None]

    def impls(self) -> list[str]:
        """The implementations registered families declare, native first."""
        found = {f.impl for f in self.model_families.values()} | {f.impl for f in self.fallback_families}
        return sorted(found, key=lambda i: (i != NATIVE, i))
