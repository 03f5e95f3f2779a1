"""Plugin discovery and the plugin manager.

Plugins are found through the entry-point group ``patchbay`` (see
:mod:`patchbay`). One :class:`pluggy.PluginManager` is made per app, in
:func:`load_plugins`, never at import time. An allowlist (``--plugins``)
blocks every other plugin *before* it is imported; a plugin that fails to
import, or an allowlisted name that no installed plugin has, stops start-up.

Set ``PATCHBAY_TRACE_PLUGINS=1`` to log every registration hook call.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Iterable

import attrs
import pluggy

from patchbay import ENTRY_POINT_GROUP, hookspecs
from patchbay.registry import DefaultModel, Registries, StartupError

log = logging.getLogger("patchbay.plugins")

#: hook name -> the kind a plugin implementing it is listed as
HOOK_KINDS = {
    "register_routes": "endpoint",
    "register_model_families": "model",
    "register_decoding_backends": "decoding",
    "register_logits_processors": "logits-processor",
    "register_tool_parsers": "tool-parser",
    "register_reasoning_parsers": "reasoning-parser",
    "default_model": "default-model",
}


@attrs.frozen
class PluginInfo:
    name: str
    kind: str
    distribution: str
    version: str
    module: str


@attrs.define
class PluginSet:
    manager: pluggy.PluginManager
    infos: list[PluginInfo]

    def build_registries(self) -> Registries:
        """Call every registration hook, each plugin with its own ``register`` callback."""
        reg = Registries()
        trace = os.environ.get("PATCHBAY_TRACE_PLUGINS", "") not in ("", "0")
        registrars = {
            "register_routes": reg.route_registrar,
            "register_model_families": reg.family_registrar,
            "register_decoding_backends": reg.decoding_registrar,
            "register_logits_processors": reg.logits_processor_registrar,
            "register_tool_parsers": reg.tool_parser_registrar,
            "register_reasoning_parsers": reg.reasoning_parser_registrar,
        }
        for hook_name, registrar in registrars.items():
            caller = getattr(self.manager.hook, hook_name)
            # get_hookimpls() lists in reverse call order (trylast first).
            for impl in reversed(caller.get_hookimpls()):
                if trace:
                    log.info("hook %s -> plugin %s", hook_name, impl.plugin_name)
                try:
                    impl.function(register=registrar(impl.plugin_name))
                except StartupError:
                    raise
                except Exception as exc:
                    raise StartupError(
                        f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
                    ) from exc
        return reg


    def default_model(self) -> DefaultModel | None:
        """What the ``default_model`` hook offers (the first plugin to answer), or None."""
        return self.manager.hook.default_model()


def _kind(plugin: Any) -> str:
    kinds = [kind for hook, kind in HOOK_KINDS.items() if callable(getattr(plugin, hook, None))]
    return ",".join(kinds) or "other"


def _discover() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise StartupError(
                f"two installed plugins are named {ep.name!r}: {found[ep.name].value} and {ep.value}"
            )
        found[ep.name] = ep
    return found


def load_plugins(allow: Iterable[str] | None = None, extra: Iterable[tuple[str, Any]] = ()) -> PluginSet:
    """Load the installed plugins (only those in ``allow`` when given).

    ``extra`` adds ``(name, object)`` plugins that are not installed (tests
    use it to register throwaway plugins); the allowlist does not apply to them.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    available = _discover()
    allowed = None if allow is None else list(dict.fromkeys(allow))
    if allowed is not None:
        unknown = [name for name in allowed if name not in available]
        if unknown:
            raise StartupError(
                f"--plugins names {', '.join(map(repr, unknown))}, which no installed plugin has; "
                f"installed: {', '.join(sorted(available))}"
            )
    infos: list[PluginInfo] = []
    for name in sorted(available):
        ep = available[name]
        if allowed is not None and name not in allowed:
            pm.set_blocked(name)
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise StartupError(f"plugin {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}") from exc
        pm.register(plugin, name=name)
        dist = ep.dist
        infos.append(
            PluginInfo(
                name=name,
                kind=_kind(plugin),
                distribution=dist.metadata["Name"] if dist else "?",
                version=dist.version if dist else "?",
                module=ep.value,
            )
        )
    for name, plugin in extra:  # explicitly handed over: never filtered by the allowlist
        pm.register(plugin, name=name)
        infos.append(PluginInfo(name, _kind(plugin), "(in-process)", "-", repr(plugin)))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        raise StartupError(f"plugin {name!r}: {exc}") from exc
    return PluginSet(manager=pm, infos=infos)


def format_plugin_list(infos: list[PluginInfo]) -> str:
    """``NAME KIND DISTRIBUTION VERSION``, one plugin per line, columns aligned."""
    rows = [(i.name, i.kind, i.distribution, i.version) for i in infos]
    if not rows:
        return ""
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
