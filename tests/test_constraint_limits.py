"""Structured-output constraints as hostile input: limits named in 400s and answered fast, schemas with no
finite instance, and grammars in both dialects (Lark and GBNF) as their own docs write them."""

from __future__ import annotations

import ast
import json
import re
import time

import jsonschema
import pytest

from apikit import api_client, assert_error
from patchbay.constraint_limits import MAX_REPEAT, has_finite_instance, regex_repeat
from patchbay_plugins.decoding.outlines_backend.compile import grammar_dialect

COMP = "/v1/completions"

# Lark's own calculator example (lark-parser docs, examples/calc.py): `?rule:` inlines single children
LARK_CALC = r"""
?start: sum
      | NAME "=" sum    -> assign_var

?sum: product
    | sum "+" product   -> add
    | sum "-" product   -> sub

?product: atom
    | product "*" atom  -> mul
    | product "/" atom  -> div

?atom: NUMBER           -> number
     | "-" atom         -> neg
     | NAME             -> var
     | "(" sum ")"

%import common.CNAME -> NAME
%import common.NUMBER
%import common.WS_INLINE

%ignore WS_INLINE
"""

# llama.cpp's grammars/arithmetic.gbnf
GBNF_ARITHMETIC = r"""
root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
"""


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama, max_model_len=512) as c:
        yield c


def post_fast(client, body, limit=3.0):
    start = time.monotonic()
    r = client.post(COMP, json={"prompt": "x", "max_tokens": 8, **body})
    assert time.monotonic() - start < limit, f"took {time.monotonic() - start:.1f} s"
    return r


def test_dialect_rule():
    assert grammar_dialect(LARK_CALC) == "lark"
    assert grammar_dialect(GBNF_ARITHMETIC) == "gbnf"
    assert grammar_dialect('start: "a"\n// a comment mentioning ::= in passing is no rule') == "lark"


def _arith(text: str) -> bool:
    """A Lark-calc sentence: optional `NAME =`, then an arithmetic expression."""
    text = re.sub(r"^\s*[A-Za-z_]\w*\s*=", "", text, count=1)
    if not re.fullmatch(r"[\w\s.+\-*/()]*", text):
        return False
    try:
        ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return False
    return True


@pytest.mark.parametrize("stream", [False, True])
def test_lark_grammar_with_inlined_rules_is_parsed_as_lark(client, stream):
    body = {"prompt": "1+1", "max_tokens": 24, "n": 3, "seed": 1, "guided_grammar": LARK_CALC, "stream": stream}
    r = client.post(COMP, json=body)
    assert r.status_code == 200, r.text
    if not stream:
        for c in r.json()["choices"]:
            if c["finish_reason"] == "stop":
                assert _arith(c["text"]), c["text"]


def test_gbnf_grammar_is_parsed_as_gbnf(client):
    r = client.post(COMP, json={"prompt": "a = b", "max_tokens": 30, "n": 3, "seed": 2,
                                "structured_outputs": {"grammar": GBNF_ARITHMETIC}})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert "=" not in c["text"] or re.match(r"[a-z0-9(]", c["text"]), c["text"]
        if c["finish_reason"] == "stop":
            for line in c["text"].split("\n")[:-1]:
                left, right = line.split("=", 1)
                assert _arith(left) and _arith(right), line


def deep(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("case, param, needle", [
    ({"guided_json": '{"type": "object", "properties": {"a": ' * 2000 + '{"type": "string"}' + "}}" * 2000},
     "guided_json", ""),
    ({"guided_json": deep(40)}, "guided_json", "levels of nested subschemas"),
    ({"guided_json": {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                                      for i in range(10_000)}}}, "guided_json", "bytes of JSON schema"),
    ({"guided_json": {"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(3000)} | {
        "d3000": {"type": "integer"}}, "$ref": "#/$defs/d0"}}, "guided_json", "$ref occurrences"),
    ({"guided_json": {"type": "string", "maxLength": 100_000}}, "guided_json", "maxLength"),
    ({"guided_regex": "(a{100}){100}"}, "guided_regex", "repetitions"),
    ({"guided_regex": "a" * 20_000}, "guided_regex", "bytes of regex"),
    ({"guided_choice": [str(i) for i in range(5000)]}, "guided_choice", "choices"),
    ({"guided_grammar": 'start: "a"\n' * 20_000}, "guided_grammar", "bytes of grammar"),
])
def test_limits_are_400s_naming_them_and_fast(client, case, param, needle):
    err = assert_error(post_fast(client, case), 400, param)
    assert needle in err["message"], err


NO_FINITE = {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}},
                                "required": ["next"]}}, "$ref": "#/$defs/node"}
TREE = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
    "type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"],
    "additionalProperties": False}}, "$ref": "#/$defs/node"}


def test_finite_instance_analysis():
    assert not has_finite_instance(NO_FINITE)
    assert not has_finite_instance({"type": "object", "properties": {"a": False}, "required": ["a"]})
    assert not has_finite_instance({"type": "array", "items": {"$ref": "#"}, "minItems": 1})
    assert has_finite_instance(TREE)
    assert has_finite_instance({"anyOf": [{"$ref": "#"}, {"type": "null"}]})
    assert has_finite_instance({"type": "array", "items": {"$ref": "#"}})


@pytest.mark.parametrize("backend", ["outlines", "lm-format-enforcer"])
def test_a_schema_with_no_finite_instance_is_refused(client, backend):
    err = assert_error(post_fast(client, {"guided_json": NO_FINITE, "guided_decoding_backend": backend}), 400,
                       "guided_json")
    assert "finite" in err["message"]


@pytest.mark.parametrize("backend", ["outlines", "lm-format-enforcer"])
def test_a_recursive_schema_with_finite_instances_yields_valid_output(client, backend):
    r = client.post(COMP, json={"prompt": "{", "max_tokens": 60, "n": 4, "seed": 3, "guided_json": TREE,
                                "guided_decoding_backend": backend})
    if r.status_code == 400:  # a backend may refuse recursion outright; it must say so
        assert "ref" in r.json()["error"]["message"].lower(), r.text
        return
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        if c["finish_reason"] == "stop":
            jsonschema.validate(json.loads(c["text"]), TREE)


def test_regex_repeat_count():
    assert regex_repeat("a{3}(b{4}){5}") == 20
    assert regex_repeat("a*b+") == 1
    assert regex_repeat("(x{70}){70}") == 4900 > MAX_REPEAT
