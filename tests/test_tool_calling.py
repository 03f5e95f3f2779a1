"""Tool calling on /v1/chat/completions, in-process, on a tiny Qwen2 with a Hermes-style chat template: every
tool_choice mode, streamed or not, parallel or not, in the model's own markup (--tool-call-parser hermes) and in
the JSON forms (no parser); the parsers fed known text through a structured-output choice; strict tools in
"auto" held to their schemas once a call opens; reasoning; the deprecated functions API; the 400s."""

from __future__ import annotations

import json

import jsonschema
import pytest

from apikit import api_client, assert_error, sse_events

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 23},
                                                                          "on": {"type": "boolean"}},
                                        "required": ["hour", "on"], "additionalProperties": False}}}
TOOLS = [WEATHER, ALARM]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "Weather in Oslo, and wake me at seven?"}]
FORCED = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
          '\n<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7, "on": true}}\n</tool_call>')


@pytest.fixture(scope="module")
def hermes(tiny_tool_model):
    with api_client(tiny_tool_model, max_model_len=2048, tool_call_parser="hermes", enable_auto_tool_choice=True) as c:
        yield c


@pytest.fixture(scope="module")
def plain(tiny_tool_model):
    with api_client(tiny_tool_model, max_model_len=2048) as c:
        yield c


def chat(client, **body):
    r = client.post(CHAT, json={"messages": MESSAGES, "tools": TOOLS, "max_tokens": 400, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def streamed(client, **body) -> tuple[dict, list[dict]]:
    """The streamed choice put back together (content, reasoning, calls by index) and its chunks."""
    r = client.post(CHAT, json={"messages": MESSAGES, "tools": TOOLS, "max_tokens": 400, "temperature": 0,
                                "stream": True, **body})
    assert r.status_code == 200, r.text
    chunks = [e for e in sse_events(r.text) if e != "[DONE]"]
    out = {"content": "", "reasoning_content": "", "calls": {}, "finish_reason": None}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            out["content"] += delta.get("content") or ""
            out["reasoning_content"] += delta.get("reasoning_content") or ""
            for tc in delta.get("tool_calls") or []:
                if tc["index"] not in out["calls"]:
                    assert tc["id"].startswith("call_") and tc["type"] == "function" and tc["function"]["name"]
                    out["calls"][tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                out["calls"][tc["index"]]["arguments"] += tc["function"].get("arguments") or ""
            if choice["finish_reason"] is not None:
                out["finish_reason"] = choice["finish_reason"]
    return out, chunks


def check_calls(calls: list[dict], names: set[str] | None = None) -> None:
    """Unique non-empty ids, function type, a known name, strict-JSON arguments valid against its schema."""
    assert len({c["id"] for c in calls}) == len(calls)
    for call in calls:
        assert call["id"] and call["type"] == "function"
        name = call["function"]["name"]
        assert name in (names or SCHEMAS)
        args = json.loads(call["function"]["arguments"], parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
        jsonschema.validate(args, SCHEMAS[name])


# --------------------------------------------------------------------------- required / named, constrained


@pytest.mark.parametrize("server", ["hermes", "plain"])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_constrained_calls_are_valid_streamed_or_not(request, server, parallel, choice):
    client = request.getfixturevalue(server)
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "set_alarm"}}
    for seed in (0, 1):
        body = {"tool_choice": tool_choice, "parallel_tool_calls": parallel, "temperature": 1.0, "seed": seed,
                "max_tokens": 160}
        whole = chat(client, **body)["choices"][0]
        calls = whole["message"]["tool_calls"]
        if whole["finish_reason"] != "length":
            assert calls, whole
            assert whole["finish_reason"] == ("tool_calls" if choice == "required" else "stop")
        check_calls(calls, {"set_alarm"} if choice == "named" else None)
        if not parallel or choice == "named":
            assert len(calls) <= 1 and (len(calls) == 1 or whole["finish_reason"] == "length")
        assert whole["message"]["content"] in (None, "")
        stream, _ = streamed(client, **body)
        assert stream["finish_reason"] == whole["finish_reason"]
        got = [(c["name"], c["arguments"]) for c in stream["calls"].values()]
        want = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        if whole["finish_reason"] == "length":  # a call cut off was streamed as far as it went; it is not returned
            assert got[: len(want)] == want and len(got) - len(want) <= 1
        else:
            assert got == want
        assert stream["content"] == ""


def test_required_in_the_models_markup_and_in_the_json_form(hermes, plain):
    """With a parser the calls are decoded in the model's own markup; without one, as vLLM's JSON list."""
    body = {"tool_choice": "required", "parallel_tool_calls": False, "logprobs": True, "max_tokens": 80}
    native = chat(hermes, **body)["choices"][0]
    text = "".join(t["token"] for t in native["logprobs"]["content"])
    assert text.startswith("<tool_call>\n{\"name\": \"") and text.rstrip().endswith("</tool_call>")
    form = chat(plain, **body)["choices"][0]
    text = "".join(t["token"] for t in form["logprobs"]["content"])
    assert json.loads(text)[0]["name"] == form["message"]["tool_calls"][0]["function"]["name"]
    named = chat(plain, **{**body, "tool_choice": {"type": "function", "function": {"name": "set_alarm"}}})
    args = named["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert "".join(t["token"] for t in named["choices"][0]["logprobs"]["content"]) == args


# --------------------------------------------------------------------------- auto: the parser on known text


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_parses_the_models_markup(hermes, parallel):
    body = {"structured_outputs": {"choice": [FORCED]}, "parallel_tool_calls": parallel, "max_tokens": 400}
    whole = chat(hermes, **body)["choices"][0]
    msg = whole["message"]
    assert msg["content"] == "Let me check." and whole["finish_reason"] == "tool_calls"
    want = [("get_weather", '{"city": "Oslo", "unit": "c"}'), ("set_alarm", '{"hour": 7, "on": true}')]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == want[: 2 if parallel else 1]
    check_calls(msg["tool_calls"])
    stream, chunks = streamed(hermes, **body)
    assert stream["content"] == "Let me check." and stream["finish_reason"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in stream["calls"].values()] == want[: 2 if parallel else 1]
    for chunk in chunks:  # no markup leaks into content
        for choice in chunk["choices"]:
            assert "<tool" not in (choice["delta"].get("content") or "") and "{" not in (choice["delta"].get("content") or "")


@pytest.mark.parametrize("parser,text,content", [
    ("llama3_json", '{"name": "set_alarm", "parameters": {"hour": 7, "on": true}}', None),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "set_alarm", "arguments": {"hour": 7, "on": true}}]', "Sure."),
    ("pythonic", "[set_alarm(hour=7, on=True)]", None),
])
def test_each_builtin_parser_through_chat(tiny_tool_model, parser, text, content):
    with api_client(tiny_tool_model, max_model_len=2048, tool_call_parser=parser, enable_auto_tool_choice=True) as c:
        for stream in (False, True):
            body = {"structured_outputs": {"choice": [text]}}
            if stream:
                got, _ = streamed(c, **body)
                calls = [(v["name"], json.loads(v["arguments"])) for v in got["calls"].values()]
                shown, finish = got["content"], got["finish_reason"]
            else:
                whole = chat(c, **body)["choices"][0]
                calls = [(t["function"]["name"], json.loads(t["function"]["arguments"]))
                         for t in whole["message"]["tool_calls"]]
                shown, finish = whole["message"]["content"], whole["finish_reason"]
            assert calls == [("set_alarm", {"hour": 7, "on": True})] and finish == "tool_calls"
            assert shown == (content or ("" if stream else None))


def test_auto_without_a_call_is_content_and_none_parses_nothing(hermes):
    whole = chat(hermes, structured_outputs={"choice": ["Just an answer."]})["choices"][0]
    assert whole["message"] == {**whole["message"], "content": "Just an answer.", "tool_calls": []}
    assert whole["finish_reason"] == "stop"
    none = chat(hermes, tool_choice="none", structured_outputs={"choice": [FORCED]})["choices"][0]
    assert none["message"]["content"] == FORCED and none["message"]["tool_calls"] == []
    assert none["finish_reason"] == "stop"
    stream, _ = streamed(hermes, tool_choice="none", structured_outputs={"choice": [FORCED]})
    assert stream["content"] == FORCED and not stream["calls"]


def test_strict_tools_hold_auto_calls_to_their_schemas(hermes):
    """The model writes free text, opens a call and is forced to start it badly ("hour": 99 would break the
    schema's maximum); the lazy grammar holds the rest, so the call that comes out is valid."""
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    prefix = 'I will set it.<tool_call>\n{"name": "set_alarm", "arguments": {"hour": '
    body = {"tools": strict, "logits_processors": [{"qualname": "patchbay.force_prefix", "kwargs": {"text": prefix}}],
            "temperature": 1.0, "max_tokens": 100, "parallel_tool_calls": False}
    for seed in range(4):
        whole = chat(hermes, seed=seed, **body)["choices"][0]
        assert whole["message"]["content"] == "I will set it."
        assert whole["finish_reason"] == "tool_calls", whole
        check_calls(whole["message"]["tool_calls"], {"set_alarm"})
    # the same forced start with non-strict tools is not held: a bad call is possible, nothing guards it
    loose = chat(hermes, seed=0, **{**body, "tools": TOOLS, "logits_processors": [
        {"qualname": "patchbay.force_prefix", "kwargs": {"text": prefix + "99, \"on\": 3}}\n</tool_call>"}}],
        "max_tokens": 100})["choices"][0]
    bad = json.loads(loose["message"]["tool_calls"][0]["function"]["arguments"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMAS["set_alarm"])


def test_n_choices_each_read_on_their_own(hermes):
    whole = chat(hermes, n=2, structured_outputs={"choice": [FORCED]}, parallel_tool_calls=False)
    ids = [c["message"]["tool_calls"][0]["id"] for c in whole["choices"]]
    assert len(set(ids)) == 2 and all(c["finish_reason"] == "tool_calls" for c in whole["choices"])


# --------------------------------------------------------------------------- conversations with tool turns


def test_tool_turns_render_exactly_as_transformers_renders_them(hermes, tiny_tool_model):
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
        {"role": "assistant", "content": "Cold and sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    r = hermes.post("/tokenize", json={"messages": messages, "tools": TOOLS})
    assert r.status_code == 200, r.text
    tok = AutoTokenizer.from_pretrained(tiny_tool_model)
    hf_messages = json.loads(json.dumps(messages))
    hf_messages[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Oslo", "unit": "c"}
    text = tok.apply_chat_template(hf_messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tool_response>\n{\"temp\": -3}\n</tool_response>\n<tool_response>\nsunny" in text
    assert '"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}' in text and "# Tools" in text
    assert r.json()["tokens"] == tok.encode(text, add_special_tokens=False)
    # and a chat request with those messages runs
    assert chat(hermes, messages=messages, max_tokens=4)["usage"]["prompt_tokens"] == r.json()["count"]


def test_tool_choice_none_can_leave_tools_out_of_the_prompt(tiny_tool_model, hermes):
    with_tools = hermes.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS}).json()["count"]
    none = chat(hermes, tool_choice="none", max_tokens=1)["usage"]["prompt_tokens"]
    assert none == with_tools
    with api_client(tiny_tool_model, max_model_len=2048, exclude_tools_when_tool_choice_none=True) as c:
        bare = c.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
        assert chat(c, tool_choice="none", max_tokens=1)["usage"]["prompt_tokens"] == bare < with_tools


# --------------------------------------------------------------------------- reasoning


@pytest.fixture(scope="module")
def thinker(tiny_tool_model):
    with api_client(tiny_tool_model, max_model_len=2048, tool_call_parser="hermes", enable_auto_tool_choice=True,
                    reasoning_parser="deepseek_r1") as c:
        yield c


def test_reasoning_content_split_streamed_or_not(thinker, tiny_tool_model):
    from transformers import AutoTokenizer

    forced = "<think>Oslo is cold.</think>\n\nTake a coat."
    n = len(AutoTokenizer.from_pretrained(tiny_tool_model).encode(forced, add_special_tokens=False))
    body = {"tools": None, "max_tokens": n, "logits_processors": [
        {"qualname": "patchbay.force_prefix", "kwargs": {"text": forced}}]}
    msg = chat(thinker, **body)["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("Oslo is cold.", "Take a coat.")
    assert msg["reasoning"] == msg["reasoning_content"]
    stream, _ = streamed(thinker, **body)
    assert (stream["reasoning_content"], stream["content"]) == ("Oslo is cold.", "Take a coat.")


def test_a_reasoning_model_thinks_before_its_constrained_calls(thinker):
    """The constraint holds the answer only: free thinking first (forced here), then valid calls."""
    for seed in range(3):
        body = {"tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 100, "seed": seed,
                "temperature": 1.0, "logits_processors": [
                    {"qualname": "patchbay.force_prefix", "kwargs": {"text": "<think>Need an alarm.</think>\n"}}]}
        whole = chat(thinker, **body)["choices"][0]
        assert whole["message"]["reasoning_content"] == "Need an alarm."
        assert whole["finish_reason"] == "tool_calls"
        check_calls(whole["message"]["tool_calls"])


# --------------------------------------------------------------------------- the deprecated functions API


def test_functions_and_function_call_map_onto_tools(hermes):
    functions = [t["function"] for t in TOOLS]
    named = hermes.post(CHAT, json={"messages": MESSAGES, "functions": functions, "function_call": {"name": "set_alarm"},
                                    "max_tokens": 80, "temperature": 0}).json()["choices"][0]
    call = named["message"]["function_call"]
    assert call["name"] == "set_alarm" and named["finish_reason"] == "stop" and named["message"]["tool_calls"] == []
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["set_alarm"])
    auto = hermes.post(CHAT, json={"messages": MESSAGES, "functions": functions, "max_tokens": 400, "temperature": 0,
                                   "structured_outputs": {"choice": [FORCED]}}).json()["choices"][0]
    assert auto["message"]["function_call"]["name"] == "get_weather" and auto["finish_reason"] == "function_call"


# --------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": None, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice"),
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [WEATHER["function"]], "tools": TOOLS}, "functions"),
    ({"tools": None, "function_call": "auto"}, "function_call"),
    ({"tool_choice": "required", "use_beam_search": True, "n": 2}, "use_beam_search"),
])
def test_bad_tool_requests_are_400s_naming_the_field(hermes, body, param):
    r = hermes.post(CHAT, json={"messages": MESSAGES, "tools": TOOLS, "max_tokens": 4, **body})
    assert_error(r, 400, param)


def test_auto_needs_a_server_with_a_tool_parser(plain):
    err = assert_error(plain.post(CHAT, json={"messages": MESSAGES, "tools": TOOLS, "max_tokens": 4}), 400,
                       "tool_choice")
    assert "--enable-auto-tool-choice" in err["message"]
    ok = plain.post(CHAT, json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none", "max_tokens": 2})
    assert ok.status_code == 200


def test_unknown_parser_names_stop_startup(tiny_tool_model):
    from patchbay.config import ConfigError

    with pytest.raises(ConfigError, match="--tool-call-parser.*'nope'.*hermes"):
        with api_client(tiny_tool_model, tool_call_parser="nope"):
            pass
    with pytest.raises(ConfigError, match="--reasoning-parser.*'nope'.*deepseek_r1"):
        with api_client(tiny_tool_model, reasoning_parser="nope"):
            pass
    with pytest.raises(ConfigError, match="--enable-auto-tool-choice"):
        api_client(tiny_tool_model, enable_auto_tool_choice=True).__enter__()


def test_tool_and_reasoning_flags():
    from patchbay.config import ConfigError, config_from_args

    config, _ = config_from_args(["--tool-call-parser", "hermes", "--enable-auto-tool-choice",
                                  "--structured-outputs-config", '{"reasoning_parser": "qwen3"}'])
    assert (config.tool_call_parser, config.enable_auto_tool_choice, config.reasoning_parser) == ("hermes", True, "qwen3")
    config, _ = config_from_args(["--reasoning-parser", "deepseek_r1", "--structured-outputs-config",
                                  '{"reasoning_parser": "qwen3"}'])
    assert config.reasoning_parser == "deepseek_r1"  # the flag wins
    config, _ = config_from_args(["--responses-store", "sqlite:/tmp/x.db", "--responses-store-max-bytes", "1MiB",
                                  "--responses-store-max-entries", "5", "--exclude-tools-when-tool-choice-none"])
    assert (config.responses_store, config.responses_store_max_bytes, config.responses_store_max_entries,
            config.exclude_tools_when_tool_choice_none) == ("sqlite:/tmp/x.db", 2**20, 5, True)
    for argv, flag in ((["--enable-auto-tool-choice"], "--enable-auto-tool-choice"),
                       (["--responses-store", "postgres:x"], "--responses-store"),
                       (["--responses-store", "sqlite:"], "--responses-store"),
                       (["--responses-store-max-entries", "0"], "--responses-store-max-entries")):
        with pytest.raises(ConfigError, match=flag):
            config_from_args(argv)
