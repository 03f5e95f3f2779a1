"""/openapi.json, /docs and --enable-offline-docs: the document lists every registered route, each POST
route's request body is the JSON Schema of its declared attrs type (generated, so a field added to the type
appears without anyone editing the document), the schemas agree with what the server accepts, and the docs
page works without any network with --enable-offline-docs."""

from __future__ import annotations

import importlib.resources
import re

import attrs
import jsonschema
import pytest
from litestar import Request, post
from litestar.routes import HTTPRoute

from apikit import api_client
from patchbay import hookimpl
from patchbay.config import config_from_args

KEY = "sk-docs"


@attrs.define
class EchoRequest:
    """A third party's request type."""

    words: list[str]
    times: int = 1
    loud: bool | None = None


class EchoPlugin:
    @hookimpl
    def register_routes(self, register):
        @post("/v1/echo", opt={"body": EchoRequest})
        async def echo(request: Request) -> dict:
            """Repeat the words."""
            return {"text": " ".join((await request.json())["words"])}

        register(echo)


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama, api_key=(KEY,), extra_plugins=[("echo-test", EchoPlugin())]) as c:
        yield c


@pytest.fixture(scope="module")
def doc(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    return r.json()


def post_routes(app) -> dict[str, object]:
    """``{path as the document spells it: declared body type}`` of every POST route in the app."""
    out = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if "POST" in handler.http_methods and handler.opt.get("openapi", True) is not False:
                out[re.sub(r"{(\w+):[^}]*}", r"{\1}", route.path_format)] = handler.opt["body"]
    return out


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def validator(doc: dict, path: str, media: str = "application/json") -> jsonschema.Validator:
    """A validator of ``path``'s request body that resolves the document's ``#/components/...`` refs."""
    schema = doc["paths"][path]["post"]["requestBody"]["content"][media]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def test_every_post_route_has_a_request_body_generated_from_its_attrs_type(client, doc):
    routes = post_routes(client.app)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v2/rerank",
            "/v1/audio/transcriptions", "/v1/echo"} <= set(routes)
    for path, body_type in routes.items():
        op = doc["paths"][path]["post"]
        content = op["requestBody"]["content"]
        assert op["requestBody"]["required"] is True and content, path
        for media, entry in content.items():
            schema = resolve(doc, entry["schema"])
            members = [resolve(doc, s) for s in schema.get("anyOf", [schema])]
            types = [t for t in getattr(body_type, "__args__", (body_type,)) if attrs.has(t)]
            assert len(members) == len(types), (path, media)
            for member, tp in zip(members, types):
                fields = {f.alias or f.name for f in attrs.fields(tp) if f.init}
                assert set(member["properties"]) == fields, (path, tp)
                assert member["additionalProperties"] is False, path
        assert op["responses"]["4XX"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    speech = resolve(doc, doc["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"])
    assert speech["required"] == ["file"] and speech["properties"]["file"] == {"type": "string", "format": "binary"}
    echo = doc["components"]["schemas"]["EchoRequest"]
    assert echo["required"] == ["words"] and echo["properties"]["times"] == {"type": "integer", "default": 1}
    assert echo["properties"]["loud"] == {"anyOf": [{"type": "boolean"}, {"type": "null"}], "default": None}
    assert doc["paths"]["/v1/echo"]["post"]["summary"] == "Repeat the words."


def test_every_schema_is_valid_json_schema_and_the_document_loads(doc):
    import schemathesis

    assert doc["openapi"] == "3.1.0"
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
    operations = [r.ok() for r in schemathesis.openapi.from_dict(doc).get_all_operations()]
    assert len(operations) >= 25


def test_the_schemas_agree_with_the_server(client, doc):
    """What the schema accepts the server serves; what it refuses (a wrong type, an unknown field) the server
    refuses with a 400 naming the field."""
    h = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ("/v1/completions", {"prompt": "hello", "max_tokens": 2}, 200, None),
        ("/v1/completions", {"prompt": "hello", "max_tokens": "two"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hello", "max_tokenz": 2}, 400, "max_tokenz"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, 200, None),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/responses", {"input": "hi", "max_output_tokens": 2}, 200, None),
        ("/v1/responses", {"input": "hi", "temperature": "hot"}, 400, "temperature"),
        ("/tokenize", {"prompt": "hello"}, 200, None),
        ("/v1/echo", {"words": ["a", "b"]}, 200, None),
        ("/v1/echo", {"times": 2}, 400, None),
    ]
    for path, body, status, param in cases:
        errors = list(validator(doc, path).iter_errors(body))
        assert (not errors) == (status == 200), (path, body, errors)
        r = client.post(path, json=body, headers=h)
        if path == "/v1/echo":  # the throwaway route does not check its body: only the schema is under test
            continue
        assert r.status_code == status, (path, body, r.text)
        if param:
            assert r.json()["error"]["param"] == param, r.text


def test_security_marks_every_route_but_the_open_ones(doc):
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            open_ = path in ("/health", "/version", "/openapi.json", "/docs")
            assert ("security" not in op) == open_, (method, path)


def test_docs_page_and_document_are_open_and_use_the_cdn_by_default(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js" in page.text
    assert '"/openapi.json"' in page.text
    assert client.get("/docs/swagger-ui-bundle.js").status_code == 404  # served only with --enable-offline-docs


def test_offline_docs_serve_their_assets_from_the_installed_package(tiny_llama):
    config, _ = config_from_args([str(tiny_llama), "--enable-offline-docs"])
    assert config.enable_offline_docs is True
    with api_client(tiny_llama, api_key=(KEY,), enable_offline_docs=True) as c:
        page = c.get("/docs").text
        assert "http://" not in page and "https://" not in page  # nothing from a CDN
        refs = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert sorted(refs) == ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"]
        static = importlib.resources.files("swagger_ui") / "static"
        for ref, media in zip(sorted(refs), ("application/javascript", "text/css")):
            r = c.get(ref)
            assert r.status_code == 200 and r.headers["content-type"].startswith(media), ref
            assert r.content == (static / ref.rsplit("/", 1)[1]).read_bytes() and len(r.content) > 10_000
        assert "SwaggerUIBundle" in c.get("/docs/swagger-ui-bundle.js").text
