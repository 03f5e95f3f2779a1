"""Tools, reasoning and /v1/responses end to end: a real ``serve`` process driven by the official openai client —
chat tool calls streamed and whole, ``chat.completions.parse`` with ``pydantic_function_tool``, the Responses API
over HTTP, stored responses and ``previous_response_id`` surviving a restart with ``--responses-store sqlite:``,
and a third-party tool-call parser installed as a package (reasoning over HTTP: test_responses, test_tool_calling)."""

from __future__ import annotations

import json
import typing
import re
import time
from pathlib import Path

import jsonschema
import openai
import pydantic
import pytest

from serverkit import run_serve, serve

pytestmark = pytest.mark.e2e
PKGS = Path(__file__).parent / "plugin_pkgs"
MESSAGES = [{"role": "user", "content": "Wake me at seven."}]


class Alarm(pydantic.BaseModel):
    hour: int = pydantic.Field(ge=0, le=23)  # bounded: a random model could write digits forever
    on: bool


class Mood(pydantic.BaseModel):
    """A text format every structured-output backend can hold (an enum and a boolean)."""

    mood: typing.Literal["up", "down"]
    sure: bool


ALARM = openai.pydantic_function_tool(Alarm, name="set_alarm")


def client_of(s) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def hermes_server(tiny_tool_model, tmp_path_factory):
    args = [str(tiny_tool_model), "--served-model-name", "tiny", "--max-model-len", "2048",
            "--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    with serve(args, tmp_path_factory.mktemp("hermes")) as s:
        yield s


def test_chat_tool_calls_streamed_and_whole(hermes_server):
    client = client_of(hermes_server)
    body = dict(model="tiny", messages=MESSAGES, tools=[ALARM], tool_choice="required", parallel_tool_calls=False,
                max_tokens=80, temperature=0)
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "tool_calls"
    [call] = whole.message.tool_calls
    Alarm.model_validate_json(call.function.arguments)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **body):
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                slot["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(call.function.name, call.function.arguments)]
    assert calls[0]["id"].startswith("call_")


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
LOOSE = [WEATHER, {**ALARM, "function": {**ALARM["function"], "strict": False}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in LOOSE}
TWO_CALLS = ('Let me see.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7, "on": true}}\n</tool_call>')


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("mode", ["none", "auto", "required", "named"])
def test_every_tool_mode_through_the_client_streamed_or_not(hermes_server, mode, parallel):
    """Each tool_choice, parallel or not, whole and streamed through the openai client: valid calls (unique ids,
    known names, arguments valid against their schema), the same calls and finish_reason both ways, no markup
    in the streamed content. "none" and "auto" read a known text (forced by a structured-output choice)."""
    client = client_of(hermes_server)
    choice = {"named": {"type": "function", "function": {"name": "set_alarm"}}}.get(mode, mode)
    body = dict(model="tiny", messages=MESSAGES, tools=LOOSE, tool_choice=choice, parallel_tool_calls=parallel,
                max_tokens=300, temperature=0)
    if mode in ("none", "auto"):
        body["extra_body"] = {"structured_outputs": {"choice": [TWO_CALLS]}}
    whole = client.chat.completions.create(**body).choices[0]
    calls = [(c.id, c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert len({c[0] for c in calls}) == len(calls) and all(c[0].startswith("call_") for c in calls)
    for _, name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    if mode == "none":
        assert not calls and whole.message.content == TWO_CALLS and whole.finish_reason == "stop"
    elif mode == "auto":
        assert whole.message.content == "Let me see." and whole.finish_reason == "tool_calls"
        assert [(n, json.loads(a)) for _, n, a in calls] == [
            ("get_weather", {"city": "Oslo", "unit": "c"}), ("set_alarm", {"hour": 7, "on": True})][: 2 if parallel else 1]
    else:
        assert calls and whole.message.content in (None, "")
        assert whole.finish_reason == ("tool_calls" if mode == "required" else "stop")
        assert mode == "required" or {n for _, n, _ in calls} == {"set_alarm"}
    if not parallel or mode == "named":
        assert len(calls) <= 1
    streamed: dict[int, list[str]] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **body):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                if tc.index not in streamed:
                    assert tc.id and tc.type == "function" and tc.function.name
                    streamed[tc.index] = [tc.id, tc.function.name, ""]
                else:
                    assert tc.id is None and tc.function.name is None
                streamed[tc.index][2] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == whole.finish_reason
    assert [(n, a) for _, n, a in streamed.values()] == [(n, a) for _, n, a in calls]
    assert content == (whole.message.content or "")
    if mode != "none":
        assert "<tool_call>" not in content and "{" not in content


def test_chat_completions_parse_gives_parsed_arguments(hermes_server):
    client = client_of(hermes_server)
    for choice in ("required", {"type": "function", "function": {"name": "set_alarm"}}):
        done = client.chat.completions.parse(model="tiny", messages=MESSAGES, tools=[ALARM], tool_choice=choice,
                                             parallel_tool_calls=False, max_tokens=80, temperature=0)
        [call] = done.choices[0].message.tool_calls
        assert isinstance(call.function.parsed_arguments, Alarm)
    with client.chat.completions.stream(model="tiny", messages=MESSAGES, tools=[ALARM], tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=80, temperature=0) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.tool_calls[0].function.parsed_arguments, Alarm)


def test_responses_over_http(hermes_server):
    client = client_of(hermes_server)
    tool = {"type": "function", "name": "set_alarm", "strict": True, "parameters": Alarm.model_json_schema()
            | {"additionalProperties": False}}
    with client.responses.stream(model="tiny", input="Wake me", tools=[tool], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=80, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))
    assert final.output[0].type == "function_call"
    Alarm.model_validate_json(final.output[0].arguments)
    parsed = client.responses.parse(model="tiny", input="Mood as JSON", text_format=Mood, max_output_tokens=60,
                                    temperature=0)
    assert isinstance(parsed.output_parsed, Mood)
    assert client.responses.retrieve(final.id).output[0].arguments == final.output[0].arguments


# --------------------------------------------------------------------------- SQLite store across a restart


def test_stored_responses_survive_a_restart(tiny_tool_model, tmp_path):
    db = tmp_path / "responses.db"
    args = [str(tiny_tool_model), "--served-model-name", "tiny", "--max-model-len", "2048",
            "--responses-store", f"sqlite:{db}"]
    with serve(args, tmp_path) as s:
        client = client_of(s)
        first = client.responses.create(model="tiny", input="Remember this", max_output_tokens=6, temperature=0)
        gone = client.responses.create(model="tiny", input="Delete this", max_output_tokens=2)
        client.responses.delete(gone.id)
        running = client.responses.create(model="tiny", input="Still going", background=True,
                                          max_output_tokens=1900, extra_body={"ignore_eos": True})
        deadline = time.monotonic() + 60
        while client.responses.retrieve(running.id).status != "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        before = client.responses.create(model="tiny", previous_response_id=first.id, input="And then?",
                                         max_output_tokens=6, temperature=0)
    with serve(args, tmp_path) as s:
        client = client_of(s)
        again = client.responses.retrieve(first.id)
        assert again.output_text == first.output_text and again.usage == first.usage
        after = client.responses.create(model="tiny", previous_response_id=first.id, input="And then?",
                                        max_output_tokens=6, temperature=0)
        assert after.output_text == before.output_text and after.usage.input_tokens == before.usage.input_tokens
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(gone.id)
        stale = client.responses.retrieve(running.id)
        assert stale.status == "failed" and stale.error.code == "server_error"


# --------------------------------------------------------------------------- a third-party tool parser


def test_a_third_party_tool_parser_package(tiny_tool_model, tmp_path_factory):
    from test_plugins import pip_install

    site = pip_install(PKGS / "patchbay-functiontag", tmp_path_factory.mktemp("functiontag-site"))
    env = {"PYTHONPATH": str(site)}
    listing = run_serve(["--list-plugins"], env=env)
    assert re.search(r"^functiontag\s+tool-parser\s+patchbay-functiontag\s+0\.2\.0$", listing.stdout, re.M)
    args = [str(tiny_tool_model), "--served-model-name", "tiny", "--max-model-len", "2048",
            "--tool-call-parser", "function_tag", "--enable-auto-tool-choice"]
    with serve(args, tmp_path_factory.mktemp("functiontag"), env=env) as s:
        client = client_of(s)
        forced = 'Sure. <function=set_alarm>{"hour": 7, "on": true}</function>'
        loose = {**ALARM, "function": {**ALARM["function"], "strict": False}}  # a choice and strict tools clash
        done = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[loose], max_tokens=300,
                                              extra_body={"structured_outputs": {"choice": [forced]}})
        msg = done.choices[0].message
        assert msg.content == "Sure." and done.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
            ("set_alarm", {"hour": 7, "on": True})]
        # its grammar holds required calls to the schema
        req = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[ALARM], tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=80, temperature=0)
        [call] = req.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), ALARM["function"]["parameters"])
    out = run_serve([str(tiny_tool_model), "--tool-call-parser", "function_tag"])
    assert out.returncode != 0 and "--tool-call-parser" in out.stderr and "'function_tag'" in out.stderr
