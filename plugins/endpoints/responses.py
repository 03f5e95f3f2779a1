"""POST /v1/responses and its companions — OpenAI's Responses API (work in progress)."""

from __future__ import annotations

from patchbay import hookimpl


@hookimpl
def register_routes(register):
    pass
