"""Structured outputs end to end on the engine: every request form x both backends x stream / not.

Every choice that finishes with ``finish_reason: "stop"`` must satisfy its constraint.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from apikit import api_client, assert_error, sse_events
from patchbay import hookimpl
from patchbay.decoding import ConstraintSpec

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "Give me a record."}]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "kind", "ok", "tags"],
    "additionalProperties": False,
}
REGEX = r"(yes|no)-[0-9]{2,4}"
CHOICES = ["alpha", "beta", "gamma delta"]
GRAMMAR = r"""
start: expr
expr: NUMBER | "(" expr OP expr ")"
OP: "+" | "*"
NUMBER: /[1-9]/
"""


def valid_expr(text: str) -> bool:
    tokens = re.findall(r"[1-9]|[()+*]", text)
    if "".join(tokens) != text:
        return False
    pos = 0

    def expr() -> bool:
        nonlocal pos
        if pos < len(tokens) and tokens[pos].isdigit():
            pos += 1
            return True
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            if not expr() or pos >= len(tokens) or tokens[pos] not in "+*":
                return False
            pos += 1
            if not expr() or pos >= len(tokens) or tokens[pos] != ")":
                return False
            pos += 1
            return True
        return False

    return expr() and pos == len(tokens)


def check(kind: str, text: str, schema=SCHEMA) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), schema)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    elif kind == "grammar":
        assert valid_expr(text), text


FORMS = {
    "guided_json": ("json", {"guided_json": SCHEMA}),
    "guided_json_text": ("json", {"guided_json": json.dumps(SCHEMA)}),
    "guided_regex": ("regex", {"guided_regex": REGEX}),
    "guided_choice": ("choice", {"guided_choice": CHOICES}),
    "guided_grammar": ("grammar", {"guided_grammar": GRAMMAR}),
    "so_json": ("json", {"structured_outputs": {"json": SCHEMA}}),
    "so_regex": ("regex", {"structured_outputs": {"regex": REGEX}}),
    "so_choice": ("choice", {"structured_outputs": {"choice": CHOICES}}),
    "so_grammar": ("grammar", {"structured_outputs": {"grammar": GRAMMAR}}),
    "so_json_object": ("json_object", {"structured_outputs": {"json_object": True}}),
    "rf_json_object": ("json_object", {"response_format": {"type": "json_object"}}),
    "rf_json_schema": ("json", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "record", "schema": SCHEMA, "strict": True}}}),
}
BACKENDS = ("outlines", "lm-format-enforcer")


@pytest.fixture(scope="module")
def client(tiny_llama):
    # a random model loves whitespace tokens: without this, JSON between tokens rarely ends in 120 tokens
    with api_client(tiny_llama, max_model_len=512, structured_outputs_disable_any_whitespace=True) as c:
        yield c


def _supported(backend: str, kind: str) -> bool:
    return not (backend == "lm-format-enforcer" and kind == "grammar")


def _texts(client, path, body, stream):
    if not stream:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        out = []
        for c in r.json()["choices"]:
            text = c["message"]["content"] if path == CHAT else c["text"]
            out.append((text, c["finish_reason"]))
        return out
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for e in sse_events(r.text):
        if e == "[DONE]" or not e["choices"]:
            continue
        ch = e["choices"][0]
        piece = ch["delta"].get("content", "") if path == CHAT else ch["text"]
        texts[ch["index"]] = texts.get(ch["index"], "") + (piece or "")
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    return [(texts.get(i, ""), finish[i]) for i in sorted(finish)]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_every_backend(client, form, backend, stream):
    kind, extra = FORMS[form]
    path = CHAT if form.startswith(("rf_", "so_")) else COMP
    body = {"max_tokens": 120, "n": 3, "temperature": 1.0, "seed": 7, "guided_decoding_backend": backend,
            **extra}
    body.update({"messages": MSG} if path == CHAT else {"prompt": "Record:"})
    if not _supported(backend, kind):
        err = assert_error(client.post(path, json=body), 400)
        assert backend in err["message"]
        return
    results = _texts(client, path, body, stream)
    assert len(results) == 3
    stopped = [text for text, finish in results if finish == "stop"]
    assert stopped, f"no choice finished: {results}"
    for text in stopped:
        check(kind, text)


def test_auto_backend_and_server_default(tiny_llama):
    with api_client(tiny_llama, structured_outputs_backend="lm-format-enforcer") as c:
        # the default backend cannot do grammars: fail closed, naming it
        err = assert_error(c.post(COMP, json={"prompt": "x", "guided_grammar": GRAMMAR}), 400, "guided_grammar")
        assert "lm-format-enforcer" in err["message"] and "grammar" in err["message"]
        ok = c.post(COMP, json={"prompt": "x", "guided_grammar": GRAMMAR, "guided_decoding_backend": "auto",
                                "max_tokens": 60})
        assert ok.status_code == 200
        assert c.model.constraints.compiles >= 1


def test_logprobs_and_mixed_batches(client):
    body = {"prompt": ["Record:", "Another:"], "max_tokens": 40, "temperature": 0, "logprobs": 2,
            "guided_choice": CHOICES}
    choices = client.post(COMP, json=body).json()["choices"]
    for c in choices:
        assert c["text"] in CHOICES and c["finish_reason"] == "stop"
        assert len(c["logprobs"]["tokens"]) >= 1

    serving = client.model
    prompt = serving.encode("Mixed batch")
    from patchbay.engine.params import SamplingParams
    from enginekit import collect

    async def main():
        compiled = await serving.constraints.compile(ConstraintSpec("regex", REGEX), "outlines", "guided_regex")
        free = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        alone = await collect(serving.engine, "alone", prompt, free)
        tasks = [collect(serving.engine, f"c{i}", prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=i,
                                                                         constraint=compiled)) for i in range(4)]
        tasks.append(collect(serving.engine, "free", prompt, free))
        outs = await asyncio.gather(*tasks)
        return alone, outs

    alone, outs = asyncio.run(main())
    assert outs[-1].token_ids == alone.token_ids  # unconstrained neighbours are untouched
    for out in outs[:-1]:
        if out.finish_reason == "stop":
            assert re.fullmatch(REGEX, out.text)


@pytest.mark.parametrize(
    "body, param, contains",
    [
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided_json", ""),
        ({"guided_json": "{not json"}, "guided_json", "JSON"),
        ({"guided_regex": "a("}, "guided_regex", ""),
        ({"guided_grammar": "start: ("}, "guided_grammar", ""),
        ({"guided_choice": []}, "guided_choice", ""),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format", "one output constraint"),
        ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "xgrammar"),
        ({"guided_json": {"type": "integer", "minimum": 3}}, "guided_json", "minimum"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ""),
        ({"response_format": {"type": "yaml"}}, "response_format.type", ""),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", ""),
        ({"guided_regex": "a", "use_beam_search": True}, "use_beam_search", ""),
    ],
)
def test_bad_constraints_fail_closed(client, body, param, contains):
    assert_error(client.post(COMP, json={"prompt": "x", **body}), 400, param, contains=contains)


def test_compile_time_limit(tiny_llama, monkeypatch):
    """A compile over the limit is a 400 and the server goes on. (The backends' compiles are slowed
    down here: a warm backend compiled this schema in under a millisecond, a race with a 1 us limit.)"""
    import time

    with api_client(tiny_llama, structured_outputs_timeout=0.05) as c:
        for backend in c.model.constraints.backends.values():
            compile_ = backend.compile
            monkeypatch.setattr(backend, "compile", lambda *a, compile_=compile_: (time.sleep(0.5), compile_(*a))[1])
        err = assert_error(c.post(COMP, json={"prompt": "x", "guided_json": SCHEMA}), 400, "guided_json")
        assert "took longer" in err["message"]
        assert c.post(COMP, json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_compiled_constraints_are_cached(client):
    before = client.model.constraints.compiles
    for _ in range(3):
        client.post(COMP, json={"prompt": "x", "max_tokens": 5, "guided_regex": "[a-c]{3}",
                                "guided_decoding_backend": "outlines"})
    assert client.model.constraints.compiles - before == 1


# --------------------------------------------------------------------------- a third backend


class FirstLetter:
    """A toy backend: the output is one of the ``choice`` options' first letters. No kernel change needed."""

    name = "first-letter"

    def unsupported(self, spec):
        return None if spec.kind == "choice" else f"only choice, not {spec.kind}"

    def compile(self, spec, tokenizer):
        letters = {c[0].encode() for c in spec.value}
        allowed = [i for i, b in enumerate(tokenizer.token_bytes) if b in letters]
        return _Compiled(allowed, tokenizer.eos_token_ids)


class _Compiled:
    def __init__(self, allowed, eos):
        self.allowed, self.eos = allowed, eos

    def matcher(self):
        return _Matcher(self)


class _Matcher:
    def __init__(self, c):
        self.c, self.done = c, False

    def fill_bitmask(self, bitmask, row):
        import numpy as np
        import torch

        words = np.zeros(bitmask.shape[1], dtype=np.uint32)
        for t in (self.c.eos if self.done else self.c.allowed):
            words[t // 32] |= np.uint32(1 << (t % 32))
        bitmask[row] = torch.from_numpy(words.view(np.int32))

    def advance(self, token):
        ok = (token in self.c.eos) if self.done else (token in self.c.allowed)
        self.done = True
        return ok

    def is_terminated(self):
        return self.done


class FirstLetterPlugin:
    def __init__(self, *backends):
        self.backends = backends or (FirstLetter(),)

    @hookimpl
    def register_decoding_backends(self, register):
        for backend in self.backends:
            register(backend)


def test_a_third_backend_is_just_a_plugin(tiny_llama):
    with api_client(tiny_llama, extra_plugins=[("first-letter", FirstLetterPlugin())]) as c:
        body = {"prompt": "x", "guided_choice": CHOICES, "guided_decoding_backend": "first-letter",
                "temperature": 1.0, "n": 4, "seed": 1, "max_tokens": 5}
        texts = [ch["text"] for ch in c.post(COMP, json=body).json()["choices"]]
        assert all(t in ("a", "b", "g") for t in texts), texts
        err = assert_error(c.post(COMP, json={"prompt": "x", "guided_regex": "a",
                                              "guided_decoding_backend": "first-letter"}), 400, "guided_regex")
        assert "first-letter" in err["message"]


# --------------------------------------------------------------------------- auto's order: each backend declares it


def test_auto_tries_a_backend_with_a_lower_priority_first(tiny_llama):
    from patchbay_plugins.decoding.outlines_backend import OutlinesBackend

    eager = FirstLetter()
    eager.auto_priority = OutlinesBackend.auto_priority - 1
    with api_client(tiny_llama, extra_plugins=[("first-letter", FirstLetterPlugin(eager))]) as c:
        assert c.model.constraints.order() == ["first-letter", "outlines", "lm-format-enforcer"]
        body = {"prompt": "x", "guided_choice": CHOICES, "temperature": 1.0, "n": 4, "seed": 1, "max_tokens": 5}
        texts = [ch["text"] for ch in c.post(COMP, json=body).json()["choices"]]  # auto: the server default
        assert all(t in ("a", "b", "g") for t in texts), texts
        # what first-letter cannot honour goes on to outlines
        r = c.post(COMP, json={"prompt": "x", "guided_regex": "[0-9]{2}", "max_tokens": 8, "seed": 1})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] != "stop" or re.fullmatch("[0-9]{2}", choice["text"]), choice


class Toy:
    """A backend that honours the given kinds and compiles nothing: only its place in ``auto``'s order matters."""

    def __init__(self, name, auto_priority, kinds):
        self.name, self.auto_priority, self.kinds = name, auto_priority, kinds

    def unsupported(self, spec):
        return None if spec.kind in self.kinds else f"only {', '.join(self.kinds)}"

    def compile(self, spec, tokenizer):
        raise AssertionError("not compiled here")


def test_auto_order_is_declared_by_each_backend():
    """Lower first, ties by name; None: never chosen by auto, only by name. The kernel knows no backend by name."""
    from patchbay.errors import APIError
    from patchbay.plugins import load_plugins
    from patchbay.structured import ConstraintService
    from patchbay_plugins.decoding.outlines_backend import OutlinesBackend

    first = OutlinesBackend.auto_priority - 1
    toys = (Toy("zz-early", first, ["regex"]), Toy("aa-early", first, ["regex"]), Toy("aa-named", None, ["regex", "yaml"]))
    plugins = load_plugins(["outlines", "lm-format-enforcer"], extra=[("toys", FirstLetterPlugin(*toys))])
    backends = plugins.build_registries().decoding_backends
    service = ConstraintService(backends, lambda: None)
    try:
        assert service.order() == ["aa-early", "zz-early", "outlines", "lm-format-enforcer"]
        regex, choice = ConstraintSpec("regex", "[a-z]+"), ConstraintSpec("choice", ["a"])
        assert service.choose(regex, None, "guided_regex") is backends["aa-early"]  # auto is the default
        assert service.choose(choice, "auto", "guided_choice") is backends["outlines"]
        assert service.choose(regex, "aa-named", "guided_regex") is backends["aa-named"]
        with pytest.raises(APIError) as e:  # only aa-named could honour it, and auto never chooses it
            service.choose(ConstraintSpec("yaml", "x"), "auto", "structured_outputs")
        assert "zz-early: only regex" in e.value.message and "aa-named" not in e.value.message
        with pytest.raises(APIError, match="available: auto, aa-early, zz-early, outlines, lm-format-enforcer, aa-named"):
            service.choose(regex, "xgrammar", "guided_regex")
    finally:
        service.close()
    only_named = ConstraintService({"aa-named": toys[2]}, lambda: None)
    with pytest.raises(APIError, match="No structured-output backend is chosen by auto .*: aa-named"):
        only_named.choose(regex, "auto", "guided_regex")
    only_named.close()
    with pytest.raises(TypeError, match="auto_priority must be an int or None"):
        ConstraintService({"bad": Toy("bad", "1", ["regex"])}, lambda: None)
