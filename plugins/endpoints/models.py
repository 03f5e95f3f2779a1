"""GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from litestar import get
from litestar.params import FromPath

from patchbay import hookimpl
from patchbay.protocol import ModelCard, ModelList, unstructure
from patchbay.served import ServedModel
from patchbay.serving import ServingDep


def _card(model: ServedModel, name: str) -> ModelCard:
    return ModelCard(id=name, created=model.created, root=str(model.model_dir), max_model_len=model.max_model_len)


@get("/v1/models")
async def list_models(serving: ServingDep) -> dict:
    return unstructure(ModelList(data=[_card(m, name) for m in serving.models for name in m.names]))


@get("/v1/models/{model:path}")
async def retrieve_model(model: FromPath[str], serving: ServingDep) -> dict:
    served, name = serving.resolve(model.lstrip("/"))
    return unstructure(_card(served, name))


@hookimpl
def register_routes(register):
    register(list_models)
    register(retrieve_model)
