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
