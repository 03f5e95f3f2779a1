"""patchbay: an OpenAI-compatible inference server built as a small kernel plus plugins.

A plugin is a module (or any object) with functions marked by :data:`hookimpl`,
named after the hooks in :mod:`patchbay.hookspecs`, and published under the
entry-point group ``patchbay``; the entry point's name is the plugin's name::

    # pyproject.toml of a plugin package
    [project.entry-points.patchbay]
    hello = "patchbay_hello.plugin"

    # patchbay_hello/plugin.py
    from patchbay import hookimpl

    @hookimpl
    def register_routes(register):
        from litestar import get

        @get("/hello")
        async def hello() -> dict:
            return {"hello": "world"}

        register(hello)

patchbay's own endpoints, model families and decoders are plugins of exactly
this kind, listed in patchbay's own pyproject.
"""

import pluggy

__version__ = "0.1.0"

#: The entry-point group plugins are published under.
ENTRY_POINT_GROUP = "patchbay"

#: Marks a function as the implementation of a hook of the same name.
hookimpl = pluggy.HookimplMarker("patchbay")

__all__ = ["ENTRY_POINT_GROUP", "__version__", "hookimpl"]
