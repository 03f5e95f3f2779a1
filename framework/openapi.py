"""The OpenAPI document of whatever routes are registered, generated from their declared attrs request types.

Every POST route names the attrs type its JSON body is structured into
(``opt={"body": RequestType}``, a union where it takes several shapes; a route
taking another media type says ``opt={"content_types": ("multipart/form-data",)}``; a form is described by
:func:`form_schema`).
:func:`json_schema` turns those types into JSON Schema the way the strict
converter (:mod:`patchbay.protocol`) reads them — no unknown fields, no
coercion — so the document describes exactly what the server accepts. Every
error response is the OpenAI envelope (``components.schemas.ErrorResponse``).
A route leaves the document with ``opt={"openapi": False}``. A field typed loosely
(``Any``) because its endpoint checks it by hand, with errors of its own, declares
its shape as ``attrs.field(metadata={"schema": {...}})``.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from typing import Any, Literal, Union

import attrs

_PRIMITIVES: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    bytes: {"type": "string", "format": "binary"},
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "integer", "null"]},
        },
    }},
}


class SchemaBuilder:
    """JSON Schemas of Python types; attrs classes become named components (``#/components/schemas/X``)."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}
        self._names: dict[type, str] = {}

    def schema(self, tp: Any) -> dict[str, Any]:
        if tp is Any:
            return {}
        if tp in _PRIMITIVES:
            return dict(_PRIMITIVES[tp])
        if isinstance(tp, str):  # an annotation that could not be resolved
            return {}
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (Union, types.UnionType):
            members = [self.schema(a) for a in args]
            return members[0] if len(members) == 1 else {"anyOf": members}
        if origin is Literal:
            return {"enum": list(args)}
        if origin in (list, tuple, set, frozenset, typing.Sequence) or tp in (list, tuple):
            if origin is tuple and args and args[-1] is not Ellipsis:
                return {"type": "array", "prefixItems": [self.schema(a) for a in args],
                        "minItems": len(args), "maxItems": len(args)}
            return {"type": "array", "items": self.schema(args[0]) if args else {}}
        if origin in (dict, typing.Mapping) or tp is dict:
            return {"type": "object", "additionalProperties": self.schema(args[1]) if len(args) == 2 else {}}
        if inspect.isclass(tp) and issubclass(tp, enum.Enum):
            return {"enum": [m.value for m in tp]}
        if attrs.has(tp):
            return {"$ref": f"#/components/schemas/{self._component(tp)}"}
        if tp is None:
            return {"type": "null"}
        return {}

    def _component(self, cls: type) -> str:
        if cls in self._names:
            return self._names[cls]
        name = base = re.sub(r"\W", "_", cls.__name__)
        n = 2
        while name in self.components:
            name, n = f"{base}{n}", n + 1
        self._names[cls] = name
        self.components[name] = {}  # reserve the name: recursive types refer to it
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - unresolvable annotations: describe what resolves
            hints = {}
        props: dict[str, Any] = {}
        required = []
        for field in attrs.fields(cls):
            if not field.init:
                continue
            key = field.alias or field.name
            tp = hints.get(field.name, field.type)
            declared = field.metadata.get("schema")  # a field checked by hand documents its shape here
            prop = dict(declared) if declared is not None else self.schema(tp) if tp is not None else {}
            if field.default is attrs.NOTHING:
                required.append(key)
            elif not isinstance(field.default, attrs.Factory) and _plain(field.default):
                prop = {**prop, "default": field.default}
            props[key] = prop
        body: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            body["required"] = required
        doc = inspect.getdoc(cls)
        if doc and cls.__doc__ and not doc.startswith(cls.__name__ + "("):
            body["description"] = doc.split("\n\n", 1)[0]
        self.components[name] = body
        return name


def form_schema(cls: Any) -> dict[str, Any]:
    """The schema of the attrs type ``cls`` sent as a form (multipart or url-encoded), inlined: every value
    is a form field, so none is ``null`` (a field is left out instead) and an object is a field holding JSON
    text; ``bytes`` is an uploaded file."""
    builder = SchemaBuilder()
    ref = builder.schema(cls)
    body = dict(builder.components.get(ref.get("$ref", "").rsplit("/", 1)[-1], ref))
    if "properties" in body:
        body["properties"] = {key: _form_field(prop) for key, prop in body["properties"].items()}
    return body


def _form_field(prop: dict[str, Any]) -> dict[str, Any]:
    prop = dict(prop)
    if prop.get("default", 0) is None:
        del prop["default"]
    members = [m for m in prop.pop("anyOf", ()) if m != {"type": "null"}]
    if members:
        prop = {**(members[0] if len(members) == 1 else {"anyOf": members}), **prop}
    if prop.get("type") == "object":
        prop = {"type": "string", "contentMediaType": "application/json", "description": "a JSON object"}
    return prop


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def json_schema(tp: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(schema, components)`` of one type (for tests and tools)."""
    builder = SchemaBuilder()
    return builder.schema(tp), builder.components


def _responses(handler: Any) -> dict[str, Any]:
    media = str(handler.media_type or "")
    ok: dict[str, Any] = {"description": "Success"}
    if media.startswith("text/"):
        ok["content"] = {media: {"schema": {"type": "string"}}}
    elif handler.opt.get("body") is not None:  # JSON, or an SSE stream when the request says stream
        ok["content"] = {"application/json": {"schema": {}}, "text/event-stream": {"schema": {"type": "string"}}}
    else:
        ok["content"] = {"application/json": {"schema": {}}}
    error = {"description": "An error, in OpenAI's envelope",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    return {"200": ok, "4XX": error, "5XX": error}


def openapi_document(app: Any, *, title: str, version: str, secured: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s HTTP routes (OPTIONS / HEAD and ``opt={"openapi": False}`` left out).

    ``secured``: the server checks API keys — every route not open (``opt={"auth": False}``) says so.
    """
    from litestar.routes import HTTPRoute

    builder = SchemaBuilder()
    paths: dict[str, Any] = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        path = re.sub(r"{(\w+):[^}]*}", r"{\1}", route.path_format)
        for handler in route.route_handlers:
            if handler.opt.get("openapi", True) is False:
                continue
            for method in sorted(handler.http_methods - {"OPTIONS", "HEAD"}):
                op: dict[str, Any] = {
                    "operationId": f"{handler.handler_name}_{method.lower()}" if len(handler.http_methods) > 1
                    else handler.handler_name,
                    "summary": (inspect.getdoc(handler.fn) or path).split("\n", 1)[0],
                    "responses": _responses(handler),
                }
                params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                          for name in route.path_parameters]
                if params:
                    op["parameters"] = params
                body = handler.opt.get("body")
                if body is not None:
                    content = {t: {"schema": builder.schema(body) if t == "application/json" else form_schema(body)}
                               for t in handler.opt.get("content_types", ("application/json",))}
                    op["requestBody"] = {"required": True, "content": content}
                if secured and handler.opt.get("auth", True) is not False:
                    op["security"] = [{"bearer": []}]
                paths.setdefault(path, {})[method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": {**builder.components, "ErrorResponse": ERROR_SCHEMA}},
    }
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
