"""GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from litestar import get
from litestar.params import FromPath

from patchbay import hookimpl
from patchbay.protocol import ModelCard, ModelList, unstructure
from patchbay.serving import Serving, ServingDep


def _card(serving: Serving, name: str) -> ModelCard:
    return ModelCard(id=name, created=serving.created, root=str(serving.loaded.model_dir),
                     max_model_len=serving.max_model_len)


@get("/v1/models")
async def list_models(serving: ServingDep) -> dict:
    return unstructure(ModelList(data=[_card(serving, name) for name in serving.model_names]))


@get("/v1/models/{model:path}")
async def retrieve_model(model: FromPath[str], serving: ServingDep) -> dict:
    name = serving.check_model(model.lstrip("/"))
    return unstructure(_card(serving, name))


@hookimpl
def register_routes(register):
    register(list_models)
    register(retrieve_model)
