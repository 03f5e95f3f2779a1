"""Wire types shared by the endpoints, and the one cattrs converter.

Request bodies are decoded with msgspec, then structured into attrs classes
by :data:`converter`, which is strict: no string-to-number coercion, no
float-to-int truncation, no unknown fields. Every failure becomes a 400 in
the OpenAI envelope whose ``param`` names the offending field.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from typing import Any, TypeVar, Union

import attrs
import cattrs
import msgspec
from cattrs.cols import is_mapping, list_structure_factory, mapping_structure_factory
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn

from patchbay.errors import APIError, bad_request

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True, omit_if_default=False)

_PRIMITIVE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


class _WrongType(TypeError):
    pass


def _expect(kind: type, name: str):
    def hook(value: Any, _: Any) -> Any:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise _WrongType(f"expected {name}, got {_json_type(value)}")
        if kind is int and not -(2**63) <= value < 2**64:
            raise _WrongType("the integer is out of range (integers must fit in 64 bits)")
        return value

    return hook


for _kind, _name in _PRIMITIVE_NAMES.items():
    converter.register_structure_hook(_kind, _expect(_kind, _name))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp in _PRIMITIVE_NAMES:
        return _PRIMITIVE_NAMES[tp].split(" ", 1)[1]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"array of {_type_name(args[0])}" if args else "array"
    if origin is dict:
        return "object"
    if attrs.has(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


def _is_array(tp: Any) -> bool:
    return (typing.get_origin(tp) or tp) in (list, tuple)


def _union_factory(tp: Any, conv: cattrs.BaseConverter):
    """``X | None``: null or exactly X (inner errors keep their path). Wider unions: an array goes to
    the one array member when there is one (its errors keep their path), else the first member that
    structures wins."""
    members = typing.get_args(tp)
    concrete = [m for m in members if m is not type(None)]
    nullable = len(concrete) < len(members)
    names = " or ".join(_type_name(m) for m in members)

    def hook(value: Any, _: Any) -> Any:
        if value is None:
            if nullable:
                return None
            raise _WrongType(f"expected {names}, got null")
        if len(concrete) == 1:
            return conv.structure(value, concrete[0])
        if isinstance(value, list):  # the one array member: its errors keep their path ("documents[0]")
            arrays = [m for m in concrete if _is_array(m)]
            if len(arrays) == 1:
                return conv.structure(value, arrays[0])
        for member in concrete:
            try:
                return converter.structure(value, member)
            except Exception:
                continue
        raise _WrongType(f"expected {names}, got {_json_type(value)}")

    return hook


converter.register_structure_hook_factory(_is_union, _union_factory)
converter.register_structure_hook(Any, lambda v, _: v)


def _checked(kind: type, name: str, make_inner):
    """A hook factory that insists on the JSON container type before cattrs' own hook runs."""

    def factory(tp: Any, conv: cattrs.BaseConverter):
        inner = make_inner(tp, conv)

        def hook(value: Any, t: Any) -> Any:
            if not isinstance(value, kind):
                raise _WrongType(f"expected {name}, got {_json_type(value)}")
            return inner(value, t)

        return hook

    return factory


converter.register_structure_hook_factory(
    lambda t: t is list or typing.get_origin(t) is list, _checked(list, "an array", list_structure_factory)
)
converter.register_structure_hook_factory(is_mapping, _checked(dict, "an object", mapping_structure_factory))
converter.register_structure_hook_factory(attrs.has, _checked(dict, "an object", make_dict_structure_fn))


# --------------------------------------------------------------------------- parsing


def _path_to_param(path: str) -> str | None:
    param = path[2:] if path.startswith("$.") else path.lstrip("$")
    return param or None


def _describe(exc: BaseException, path: str) -> tuple[str, str | None]:
    if isinstance(exc, ForbiddenExtraKeysError):
        extra = sorted(exc.extra_fields)
        where = _path_to_param(path)
        name = f"{where}.{extra[0]}" if where else extra[0]
        return f"Unrecognized request argument supplied: {', '.join(extra)}", name
    if isinstance(exc, KeyError):
        return f"'{_path_to_param(path)}' is a required property", _path_to_param(path)
    param = _path_to_param(path)
    detail = str(exc) if isinstance(exc, (_WrongType, ValueError, TypeError)) else type(exc).__name__
    if isinstance(exc, TypeError) and not isinstance(exc, _WrongType):
        detail = "invalid value"
    return f"Invalid value for '{param}': {detail}", param


def _first_error(exc: BaseException, path: str = "$") -> tuple[str, str | None]:
    """Walk a cattrs exception group to its first leaf, tracking the path."""
    if isinstance(exc, cattrs.ClassValidationError):
        with_notes, _ = exc.group_exceptions()
        for inner, note in with_notes:
            return _first_error(inner, f"{path}.{note.name}")
        return _describe(exc.exceptions[0], path)
    if isinstance(exc, cattrs.IterableValidationError):
        with_notes, _ = exc.group_exceptions()
        for inner, note in with_notes:
            return _first_error(inner, f"{path}[{note.index}]")
        return _describe(exc.exceptions[0], path)
    if isinstance(exc, BaseExceptionGroup):
        return _first_error(exc.exceptions[0], path)
    return _describe(exc, path)


detailed_converter = converter.copy(detailed_validation=True)


def structure(data: Any, cls: type[T]) -> T:
    """Structure decoded JSON into ``cls`` or raise a 400 naming the field."""
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, not {_json_type(data)}.")
    try:
        return detailed_converter.structure(data, cls)
    except APIError:
        raise
    except Exception as exc:
        message, param = _first_error(exc)
        raise bad_request(message, param=param) from None


#: how deep a request body's arrays and objects may nest
MAX_JSON_DEPTH = 100

_MSGSPEC_PATH = re.compile(r" - at `\$(.*)`$")


def json_depth_over(value: Any, limit: int) -> bool:
    """True when ``value`` nests arrays / objects more than ``limit`` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


_BAD_NUMBER = object()


def _bad_number_param(body: bytes) -> str | None:
    """Where a body msgspec refused for a number holds it (``NaN``, ``Infinity``, a float out of range, an
    integer beyond 64 bits), as a ``param``: Python's json reads what msgspec will not. Only on the error
    path; ``None`` when the body is broken otherwise."""

    def integer(text: str) -> Any:
        digits = text.lstrip("-")
        return _BAD_NUMBER if len(digits) > 20 or not -(2**63) <= int(text) < 2**64 else 0

    try:
        value = json.loads(body, parse_constant=lambda _: _BAD_NUMBER, parse_int=integer,
                           parse_float=lambda t: 0.0 if math.isfinite(float(t)) else _BAD_NUMBER)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if item is _BAD_NUMBER:
            return None if path.startswith("[") else path.lstrip(".") or None  # a non-object body: no field
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}") for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item))))
    return None


def _bad_number(body: bytes, detail: str) -> APIError | None:
    param = _bad_number_param(body)
    if param is None:
        return None
    return bad_request(f"Invalid value for '{param}': {detail} (numbers must be finite and fit in 64 bits; "
                       "NaN and Infinity are not JSON).", param=param)


def decode_json(body: bytes) -> Any:
    """A request body's JSON: strict (no NaN / Infinity, numbers in range, valid UTF-8), at most
    :data:`MAX_JSON_DEPTH` deep; anything else is a 400 naming where it broke."""
    if not body:
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        value = msgspec.json.decode(body)
    except RecursionError:
        value = None
    except msgspec.ValidationError as exc:  # a number out of range (1e999, a 5,000-digit integer, 2**64)
        text = str(exc)
        m = _MSGSPEC_PATH.search(text)
        param = _path_to_param("$" + m.group(1)) if m and "..." not in m.group(1) else None
        detail = text[: m.start()] if m else text
        if param is None and (located := _bad_number(body, detail)) is not None:
            raise located from None
        raise bad_request(f"Invalid value in the request body: {detail} (numbers must fit in 64 bits and be "
                          "finite).", param=param) from None
    except msgspec.DecodeError as exc:
        if (located := _bad_number(body, "not a finite number")) is not None:
            raise located from None
        raise bad_request(f"Malformed JSON in the request body: {exc}") from None
    else:
        # cheap first: nesting can only be as deep as there are brackets
        if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH or not json_depth_over(value, MAX_JSON_DEPTH):
            return value
    raise bad_request(f"The request body nests arrays / objects more than {MAX_JSON_DEPTH} levels deep.",
                      code="nesting_too_deep")


def parse_body(body: bytes, cls: type[T]) -> T:
    return structure(decode_json(body), cls)


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)


def dumps(obj: Any) -> bytes:
    """JSON bytes of a response object (attrs classes or plain data)."""
    return msgspec.json.encode(converter.unstructure(obj) if attrs.has(type(obj)) else obj)


# --------------------------------------------------------------------------- shared shapes


@attrs.define
class ModelCard:
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "patchbay"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[Any] = attrs.Factory(list)


@attrs.define
class ModelList:
    data: list[ModelCard]
    object: str = "list"
