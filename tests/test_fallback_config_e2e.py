"""The transformers fallback beside native families in one ``serve --config FILE.yaml`` process, through the
official openai client: the tiny llama served twice (native and ``model-impl: transformers``) gives the same
greedy text; a fallback Gemma 2 (sliding window, soft-caps) answers as transformers' ``generate``, keeps
structured outputs to their constraints and makes tool calls (hermes markup, per-model parser) that are valid
against their schemas."""

from __future__ import annotations

import json
import re
import textwrap

import jsonschema
import openai
import pytest

from fallbackkit import PROMPTS, ask, reference_answers
from serverkit import serve

pytestmark = pytest.mark.e2e

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "kind": {"enum": ["cat", "dog", "fox"]},
                   "ok": {"type": "boolean"}},
    "required": ["name", "kind", "ok"],
    "additionalProperties": False,
}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23}, "on": {"type": "boolean"}},
        "required": ["hour", "on"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (ALARM, WEATHER)}


@pytest.fixture(scope="module")
def gemma(tiny_model_factory):
    from patchbay_plugins.tinymodels import HERMES_CHAT_TEMPLATE, TOOL_TOKENS

    return tiny_model_factory("Gemma2ForCausalLM", chat_template=HERMES_CHAT_TEMPLATE, added_tokens=TOOL_TOKENS)


@pytest.fixture(scope="module")
def server(tiny_llama, gemma, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fallback-config")
    (tmp / "serve.yaml").write_text(textwrap.dedent(f"""
        max-model-len: 256
        cpu-threads: 1
        models:
          - model: {tiny_llama}
            served-model-name: llama
          - model: {tiny_llama}
            served-model-name: llama-hf
            model-impl: transformers
          - model: {gemma}
            served-model-name: gemma
            max-model-len: 1024
            tool-call-parser: hermes
            enable-auto-tool-choice: true
            structured-outputs-config: {{disable_any_whitespace: true}}
    """))
    with serve(["--config", str(tmp / "serve.yaml")], tmp) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_each_model_is_served_by_the_family_its_entry_asks_for(server, client, tiny_llama, gemma):
    assert [m.id for m in client.models.list().data] == ["llama", "llama-hf", "gemma"]
    log = server.output()
    assert "LlamaForCausalLM, family llama [native implementation, --model-impl auto]" in log
    assert "LlamaForCausalLM, family transformers [transformers implementation, --model-impl transformers]" in log
    assert "Gemma2ForCausalLM, family transformers [transformers implementation, --model-impl auto]" in log


def test_native_and_fallback_llama_give_the_same_greedy_text(client):
    for kind in ("completion", "chat"):
        for prompt in (PROMPTS[0], PROMPTS[5], PROMPTS[7]):
            for stream in (False, True):
                native = ask(client, "llama", kind, prompt, stream, max_tokens=16)
                assert ask(client, "llama-hf", kind, prompt, stream, max_tokens=16) == native, (kind, prompt)


def test_the_fallback_model_answers_as_generate(client, gemma):
    want = reference_answers(gemma)
    for kind in ("completion", "chat"):
        for prompt in (PROMPTS[1], PROMPTS[6]):
            assert ask(client, "gemma", kind, prompt, stream=False) == want[(kind, prompt)], (kind, prompt)


@pytest.mark.parametrize("form", ["json_schema", "choice", "regex"])
def test_structured_outputs_hold_on_the_fallback(client, form):
    extra = {"json_schema": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "record", "schema": SCHEMA, "strict": True}}},
             "choice": {"extra_body": {"structured_outputs": {"choice": ["alpha", "beta", "gamma delta"]}}},
             "regex": {"extra_body": {"structured_outputs": {"regex": r"(yes|no)-[0-9]{2,4}"}}}}[form]
    for seed in (0, 1):
        r = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "A record, please."}],
                                           max_tokens=120, temperature=1.0, seed=seed, **extra)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        text = choice.message.content
        if form == "json_schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif form == "choice":
            assert text in ("alpha", "beta", "gamma delta")
        else:
            assert re.fullmatch(r"(yes|no)-[0-9]{2,4}", text), text


@pytest.mark.parametrize("tool_choice", ["required", "named"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_tool_calls_on_the_fallback_are_valid(client, tool_choice, stream):
    choice_arg = "required" if tool_choice == "required" else {"type": "function", "function": {"name": "set_alarm"}}
    body = dict(model="gemma", messages=[{"role": "user", "content": "Wake me at seven, and the weather?"}],
                tools=[ALARM, WEATHER], tool_choice=choice_arg, max_tokens=200, temperature=1.0, seed=3)
    if not stream:
        msg = client.chat.completions.create(**body).choices[0]
        finish, calls = msg.finish_reason, [(c.function.name, c.function.arguments) for c in msg.message.tool_calls]
    else:
        finish, parts = None, {}
        for chunk in client.chat.completions.create(stream=True, **body):
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    name, args = parts.get(tc.index, ("", ""))
                    parts[tc.index] = (name or tc.function.name or "", args + (tc.function.arguments or ""))
                finish = ch.finish_reason or finish
        calls = [parts[i] for i in sorted(parts)]
    assert finish == ("tool_calls" if tool_choice == "required" else "stop"), (finish, calls)
    assert calls
    for name, arguments in calls:
        assert name in (SCHEMAS if tool_choice == "required" else {"set_alarm"})
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
