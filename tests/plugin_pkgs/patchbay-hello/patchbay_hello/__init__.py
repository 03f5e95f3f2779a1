"""A third-party endpoint plugin: GET /hello answers with the served model's names."""

from litestar import get

from patchbay import hookimpl
from patchbay.serving import ServingDep


@get("/hello")
async def hello(serving: ServingDep) -> dict:
    return {"hello": "world", "models": serving.model_names}


@hookimpl
def register_routes(register):
    register(hello)
