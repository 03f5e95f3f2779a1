"""/v1/responses through the official openai client (in-process: the client's HTTP goes to the app through
Litestar's test transport): every input form, the response object, streamed events in order, tools, text.format
and responses.parse, store / retrieve / delete, previous_response_id, background / cancel, the store's bounds,
reasoning items, input_items, and the 400s / 404s."""

from __future__ import annotations

import json
import typing
import time

import jsonschema
import openai
import pydantic
import pytest

from apikit import api_client, assert_error

TOOL = {"type": "function", "name": "set_alarm", "strict": True, "description": "Set an alarm.",
        "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                                        "on": {"type": "boolean"}},
                       "required": ["hour", "on"], "additionalProperties": False}}
HI = {"structured_outputs": {"choice": ["Hi, friend!"]}}


@pytest.fixture(scope="module")
def server(tiny_tool_model):
    with api_client(tiny_tool_model, max_model_len=2048, tool_call_parser="hermes", enable_auto_tool_choice=True,
                    responses_store_max_entries=50) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url="http://testserver.local/v1", api_key="none", http_client=server, max_retries=0)


def prompt_tokens(server, messages, tools=None) -> int:
    body = {"messages": messages, **({"tools": tools} if tools else {})}
    return server.post("/tokenize", json=body).json()["count"]


# --------------------------------------------------------------------------- the response object


def test_a_response_and_its_usage(server, client):
    r = client.responses.create(model="tiny", input="Say hi", instructions="Be kind.", max_output_tokens=20,
                                temperature=0, metadata={"k": "v"}, user="u1", extra_body=HI)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "Hi, friend!" and r.incomplete_details is None
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed" and msg.id.startswith("msg_")
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    assert r.metadata == {"k": "v"} and r.user == "u1" and r.instructions == "Be kind." and r.model == "tiny"
    assert r.usage.input_tokens == prompt_tokens(server, [{"role": "system", "content": "Be kind."},
                                                          {"role": "user", "content": "Say hi"}])
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens > r.usage.input_tokens


def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(model="tiny", input="Say hi", max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"


def test_every_input_form_renders_as_the_chat_template_would(server, client):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Alarm "},
                                                         {"type": "input_text", "text": "at seven?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "set_alarm", "arguments": '{"hour": 7, "on": true}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "done"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Set."}]},
        {"role": "user", "content": "Thanks"},
    ]
    r = client.responses.create(model="tiny", input=items, tools=[TOOL], tool_choice="none", max_output_tokens=1)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Alarm at seven?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "set_alarm",
                                                                  "arguments": '{"hour": 7, "on": true}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "done"},
            {"role": "assistant", "content": "Set."}, {"role": "user", "content": "Thanks"}]
    tools = [{"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm.",
                                               "parameters": TOOL["parameters"]}}]
    assert r.usage.input_tokens == prompt_tokens(server, chat, tools)


# --------------------------------------------------------------------------- streaming


def test_streamed_events_in_order_add_up_to_the_whole(client):
    whole = client.responses.create(model="tiny", input="Tell me", max_output_tokens=24, temperature=0)
    events = list(client.responses.create(model="tiny", input="Tell me", max_output_tokens=24, temperature=0,
                                          stream=True))
    types = [e.type for e in events]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-5:] == ["response.output_text.delta", "response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)) and numbers[0] == 0
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text and events[-1].response.output[0].id == events[2].item.id


def test_the_stream_helper_builds_the_final_response(client):
    with client.responses.stream(model="tiny", input="Say hi", max_output_tokens=20, extra_body=HI) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hi, friend!" and final.status == "completed"


# --------------------------------------------------------------------------- tools and formats


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "set_alarm"}])
def test_function_calls_are_valid_items(client, choice, stream):
    body = dict(model="tiny", input="Wake me", tools=[TOOL], tool_choice=choice, parallel_tool_calls=False,
                max_output_tokens=60, temperature=0)
    if stream:
        with client.responses.stream(**body) as s:
            events = list(s)
            r = s.get_final_response()
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        done = next(e for e in events if e.type == "response.function_call_arguments.done")
        assert done.arguments == args == r.output[0].arguments and done.name == "set_alarm"
    else:
        r = client.responses.create(**body)
    assert r.status == "completed"
    [call] = r.output
    assert call.type == "function_call" and call.name == "set_alarm" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])


def test_auto_reads_calls_and_the_text_before_them(client):
    forced = 'On it.<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7, "on": true}}\n</tool_call>'
    r = client.responses.create(model="tiny", input="Wake me", tools=[{**TOOL, "strict": False}],
                                max_output_tokens=400, extra_body={"structured_outputs": {"choice": [forced]}})
    assert [o.type for o in r.output] == ["message", "function_call"] and r.output_text == "On it."
    assert (r.output[1].name, r.output[1].arguments) == ("set_alarm", '{"hour": 7, "on": true}')
    # the call and its output, sent back, continue the conversation
    nxt = client.responses.create(model="tiny", previous_response_id=r.id, max_output_tokens=2, tools=[TOOL], input=[
        {"type": "function_call_output", "call_id": r.output[1].call_id, "output": "ok"}])
    assert nxt.usage.input_tokens > r.usage.input_tokens


def test_max_tool_calls_bounds_the_calls(client, server):
    one = '<tool_call>\n{"name": "set_alarm", "arguments": {"hour": %d, "on": true}}\n</tool_call>'
    forced = "\n".join(one % h for h in (6, 7, 8))
    loose = {**TOOL, "strict": False}
    for limit, want in ((None, [6, 7, 8]), (2, [6, 7]), (1, [6])):
        r = client.responses.create(model="tiny", input="Wake me", tools=[loose], max_output_tokens=400,
                                    extra_body={"max_tool_calls": limit, "structured_outputs": {"choice": [forced]}})
        assert [json.loads(o.arguments)["hour"] for o in r.output] == want and r.max_tool_calls == limit
    for seed in range(3):  # required: the grammar itself stops at the bound
        r = client.responses.create(model="tiny", input="Wake me", tools=[TOOL], tool_choice="required",
                                    max_output_tokens=200, temperature=1.0, extra_body={"max_tool_calls": 2, "seed": seed})
        assert 1 <= len(r.output) <= 2 or r.status == "incomplete"
    assert_error(server.post("/v1/responses", json={"input": "x", "max_tool_calls": 0}), 400, "max_tool_calls")


class Alarm(pydantic.BaseModel):
    hour: int = pydantic.Field(ge=0, le=23)
    on: bool


class Mood(pydantic.BaseModel):
    """A text format every structured-output backend can hold (an enum and a boolean)."""

    mood: typing.Literal["up", "down"]
    sure: bool


def test_text_format_json_schema_and_responses_parse(client):
    r = client.responses.parse(model="tiny", input="Mood?", text_format=Mood, max_output_tokens=60, temperature=0)
    assert r.status == "completed" and isinstance(r.output_parsed, Mood)
    assert Mood.model_validate_json(r.output_text) == r.output_parsed
    assert r.text.format.type == "json_schema"
    obj = client.responses.create(model="tiny", input="JSON please", text={"format": {"type": "json_object"}},
                                  max_output_tokens=60, temperature=0)
    assert obj.output_text.lstrip().startswith("{")  # held to an object even when cut off
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


# --------------------------------------------------------------------------- store, retrieve, continue


def test_store_retrieve_delete(client, server):
    r = client.responses.create(model="tiny", input="Keep me", max_output_tokens=4, temperature=0)
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    gone = server.get(f"/v1/responses/{r.id}")
    assert_error(gone, 404, "response_id")
    assert_error(server.delete(f"/v1/responses/{r.id}"), 404, "response_id")
    unstored = client.responses.create(model="tiny", input="Forget me", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    assert_error(server.get("/v1/responses/resp_nope"), 404, "response_id")


def test_previous_response_id_continues_exactly_as_if_sent_as_input(client):
    first = client.responses.create(model="tiny", input="First question", instructions="Be kind.",
                                    max_output_tokens=8, temperature=0)
    follow = client.responses.create(model="tiny", previous_response_id=first.id, input="And then?",
                                     max_output_tokens=8, temperature=0)
    explicit = client.responses.create(model="tiny", max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "First question"},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"role": "user", "content": "And then?"}])
    assert follow.previous_response_id == first.id
    assert follow.usage.input_tokens == explicit.usage.input_tokens  # instructions are not carried over
    assert follow.output_text == explicit.output_text
    items = client.responses.input_items.list(follow.id, order="asc")
    assert [i.type for i in items.data] == ["message", "message", "message"]
    assert items.data[0].content[0].text == "First question" and all(i.id for i in items.data)


def test_a_call_cut_off_is_an_incomplete_item_and_is_not_continued(client, server, tiny_tool_model):
    """Cut inside its arguments, the call stays in the output (its events were streamed) as an incomplete item;
    continuing the response leaves it out, as chat leaves a cut call out; a finished call whose arguments are
    not JSON is a 400 naming the item."""
    from transformers import AutoTokenizer

    start = '<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7'
    n = len(AutoTokenizer.from_pretrained(tiny_tool_model).encode(start, add_special_tokens=False))
    cut = client.responses.create(model="tiny", input="Alarm?", tools=[TOOL], tool_choice="auto", max_output_tokens=n,
                                  extra_body={"logits_processors": [{"qualname": "patchbay.force_prefix", "kwargs": {
                                      "text": start + ', "on": true}}\n</tool_call>'}}]})
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, o.status, o.name, o.arguments) for o in cut.output] == [
        ("function_call", "incomplete", "set_alarm", '{"hour": 7')]
    after = client.responses.create(model="tiny", previous_response_id=cut.id, input="Again?", max_output_tokens=1)
    fresh = client.responses.create(model="tiny", max_output_tokens=1, input=[
        {"role": "user", "content": "Alarm?"}, {"role": "user", "content": "Again?"}])
    assert after.usage.input_tokens == fresh.usage.input_tokens
    bad = {**cut.output[0].model_dump(exclude_none=True), "status": "completed"}
    r = server.post("/v1/responses", json={"input": [{"role": "user", "content": "Alarm?"}, bad], "max_output_tokens": 1})
    assert_error(r, 400, "input[1].arguments")


def test_output_text_logprobs(client, server):
    """include message.output_text.logprobs with top_logprobs: one entry per output token, whole and streamed,
    each with its top alternatives (the chosen token's log-probability at temperature 0 is the highest)."""
    body = dict(model="tiny", input="Tell me", max_output_tokens=6, temperature=0, top_logprobs=2,
                include=["message.output_text.logprobs"])
    r = client.responses.create(**body)
    lps = r.output[0].content[0].logprobs
    assert len(lps) == r.usage.output_tokens == 6  # a token whose text is held back (part of a character) too
    chat = server.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 6, "temperature": 0, "logprobs": True,
        "top_logprobs": 2}).json()["choices"][0]["logprobs"]["content"]
    assert [(lp.bytes, round(lp.logprob, 4)) for lp in lps] == [(c["bytes"], round(c["logprob"], 4)) for c in chat]
    for lp in lps:
        assert len(lp.top_logprobs) == 2 and lp.logprob == max(t.logprob for t in lp.top_logprobs) <= 0
    events = list(client.responses.create(stream=True, **body))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [(lp.token, round(lp.logprob, 4)) for lp in streamed] == [(lp.token, round(lp.logprob, 4)) for lp in lps]
    plain = client.responses.create(**{**body, "include": None, "top_logprobs": None})
    assert plain.output[0].content[0].logprobs in (None, [])


def test_truncation_auto_drops_the_oldest_turns_until_it_fits(tiny_tool_model):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "words and more words " * 6}
             for i in range(9)]
    with api_client(tiny_tool_model, max_model_len=256) as server:
        body = {"input": turns, "instructions": "Be brief.", "max_output_tokens": 1}
        assert_error(server.post("/v1/responses", json=body), 400, "input")
        r = server.post("/v1/responses", json={**body, "truncation": "auto"})
        assert r.status_code == 200, r.text
        used = r.json()["usage"]["input_tokens"]
        system = [{"role": "system", "content": "Be brief."}]
        kept = next(k for k in range(len(turns), 0, -1) if prompt_tokens(server, system + turns[-k:]) < 256)
        assert kept < len(turns) and used == prompt_tokens(server, system + turns[-kept:])
        assert r.json()["truncation"] == "auto"


def test_input_items_are_paged(client, server):
    items = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(5)]
    r = client.responses.create(model="tiny", input=items, max_output_tokens=1)
    asc = client.responses.input_items.list(r.id, order="asc", limit=100).data
    assert [i.content[0].text for i in asc] == [f"m{i}" for i in range(5)] and len({i.id for i in asc}) == 5
    page = client.responses.input_items.list(r.id, limit=2)  # newest first by default
    assert [i.content[0].text for i in page.data] == ["m4", "m3"] and page.has_more and page.last_id == page.data[1].id
    after = client.responses.input_items.list(r.id, limit=2, after=page.last_id)
    assert [i.content[0].text for i in after.data] == ["m2", "m1"] and after.has_more
    before = server.get(f"/v1/responses/{r.id}/input_items?order=asc&before={asc[3].id}").json()
    assert [i["content"][0]["text"] for i in before["data"]] == ["m0", "m1", "m2"] and not before["has_more"]
    for query, param in (("limit=0", "limit"), ("order=up", "order"), ("after=nope", "after"), ("limit=ten", "limit")):
        assert_error(server.get(f"/v1/responses/{r.id}/input_items?{query}"), 400, param)
    assert_error(server.get(f"/v1/responses/{r.id}?stream=true&starting_after=x"), 400, "starting_after")
    assert_error(server.get("/v1/responses/resp_nope/input_items"), 404, "response_id")


def test_reasoning_effort_reaches_the_chat_template(tiny_tool_model):
    template = ("{% if reasoning_effort %}{{ ('effort ' + reasoning_effort + ' ') * 8 }}{% endif %}"
                "{% for m in messages %}{{ m['content'] }};{% endfor %}")
    with api_client(tiny_tool_model, max_model_len=2048, chat_template=template) as server:
        def tokens(effort):
            kwargs = {"reasoning_effort": effort} if effort else {}
            return server.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}],
                                                  "chat_template_kwargs": kwargs}).json()["count"]

        for effort in (None, "high"):
            body = {"input": "x", "max_output_tokens": 1, **({"reasoning": {"effort": effort}} if effort else {})}
            r = server.post("/v1/responses", json=body).json()
            assert r["usage"]["input_tokens"] == tokens(effort) and r["reasoning"]["effort"] == effort
        assert tokens("high") > tokens(None) + 8


def test_previous_response_id_must_exist(client, server):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", previous_response_id="resp_missing", input="hi")
    r = server.post("/v1/responses", json={"input": "hi", "previous_response_id": "resp_missing"})
    assert_error(r, 404, "previous_response_id")


def test_the_store_is_bounded(tiny_tool_model):
    with api_client(tiny_tool_model, max_model_len=2048, responses_store_max_entries=2) as c:
        made = [c.post("/v1/responses", json={"input": f"n{i}", "max_output_tokens": 1}).json() for i in range(3)]
        ids = [r["id"] for r in made]
        assert c.get(f"/v1/responses/{ids[0]}").status_code == 404
        assert all(c.get(f"/v1/responses/{i}").status_code == 200 for i in ids[1:])
    size = len(json.dumps(made[0], separators=(",", ":"))) + 150  # the response and its input item
    with api_client(tiny_tool_model, max_model_len=2048, responses_store_max_bytes=int(2.5 * size)) as c:
        ids = [c.post("/v1/responses", json={"input": f"n{i}", "max_output_tokens": 1}).json()["id"]
               for i in range(4)]
        kept = [c.get(f"/v1/responses/{i}").status_code for i in ids]
        assert kept == [404, 404, 200, 200]


def test_the_sqlite_store_is_bounded_and_reopens(tmp_path):
    """The SQLite store directly: the same bounds as memory (oldest first, an update keeps its place), kept
    across a reopen, unfinished responses marked failed on reopen, WAL without an fsync per write."""
    from patchbay_plugins.endpoints.responses_store import open_store

    def entry(rid, status="completed", pad=0):
        return {"response": {"id": rid, "status": status, "output": [], "pad": "x" * pad}, "input": []}

    db = f"sqlite:{tmp_path / 'r.db'}"
    store = open_store(db, 3, 10_000)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    for rid in ("a", "b", "c"):
        store.put(rid, entry(rid))
    store.put("a", entry("a", "in_progress"))  # an update keeps its place
    store.put("d", entry("d"))
    assert [store.get(r) is not None for r in "abcd"] == [False, True, True, True]
    pad = 9_950 - len(json.dumps(entry("e"), separators=(",", ":")))  # e alone: 9,950 of the 10,000 bytes
    store.put("e", entry("e", pad=pad))  # past the bytes: the oldest go until it fits
    assert [store.get(r) is not None for r in "bcde"] == [False, False, False, True]
    store.put("f", entry("f", "queued"))  # and e no longer fits beside it
    assert [store.get(r) is not None for r in "ef"] == [False, True]
    store.put("g", entry("g"))
    store.close()
    again = open_store(db, 3, 10_000)
    assert again.get("f")["response"]["status"] == "failed" and again.get("g") == entry("g")
    assert again.delete("g") and not again.delete("g") and again.get("g") is None
    again.close()


# --------------------------------------------------------------------------- background


def wait_for(client, rid, statuses, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        r = client.responses.retrieve(rid)
        if r.status in statuses:
            return r
        assert time.monotonic() < deadline, r.status
        time.sleep(0.05)


def test_background_runs_and_is_polled(client):
    r = client.responses.create(model="tiny", input="In the background", background=True, max_output_tokens=6,
                                temperature=0)
    assert r.status in ("queued", "in_progress") and r.background
    done = wait_for(client, r.id, {"completed", "incomplete"})
    fg = client.responses.create(model="tiny", input="In the background", max_output_tokens=6, temperature=0)
    assert done.output_text == fg.output_text and done.usage.output_tokens == 6


def test_cancel_stops_it_and_frees_its_blocks(client, server):
    stats = server.model.engine.stats
    r = client.responses.create(model="tiny", input="Go on and on", background=True, max_output_tokens=1500,
                                extra_body={"ignore_eos": True})
    wait_for(client, r.id, {"in_progress"})
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    final = wait_for(client, r.id, {"cancelled"})
    assert final.status == "cancelled"
    deadline = time.monotonic() + 30
    while stats().free_blocks != stats().total_blocks or stats().running:
        assert time.monotonic() < deadline, stats()
        time.sleep(0.05)
    fg = client.responses.create(model="tiny", input="Not background", max_output_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(fg.id)


def test_a_background_stream_can_be_followed_from_where_it_was(client):
    r = client.responses.create(model="tiny", input="Follow me", background=True, max_output_tokens=8, temperature=0)
    wait_for(client, r.id, {"completed", "incomplete"})
    with client.responses.stream(response_id=r.id, starting_after=2) as s:
        events = list(s)
    assert events[0].sequence_number == 3 and events[-1].type == "response.incomplete"


def test_deleting_a_running_background_response_cancels_it(client):
    r = client.responses.create(model="tiny", input="Delete me", background=True, max_output_tokens=1500,
                                extra_body={"ignore_eos": True})
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        wait_for(client, r.id, {"completed"}, timeout=30)


# --------------------------------------------------------------------------- reasoning


def test_reasoning_items(tiny_tool_model):
    forced = "<think>Seven is early.</think>Done."
    with api_client(tiny_tool_model, max_model_len=2048, reasoning_parser="deepseek_r1") as server:
        client = openai.OpenAI(base_url="http://testserver.local/v1", api_key="x", http_client=server)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_tool_model)
        n = len(tok.encode(forced, add_special_tokens=False))
        # counted by the engine's per-token text offsets (RequestOutput.text_offsets): without them, 0
        thought = len(tok.encode("<think>Seven is early.</think>", add_special_tokens=False))
        body = dict(model="tiny", input="Alarm?", max_output_tokens=n, extra_body={"logits_processors": [
            {"qualname": "patchbay.force_prefix", "kwargs": {"text": forced}}]})
        r = client.responses.create(**body)
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "Seven is early." and r.output_text == "Done."
        assert r.usage.output_tokens_details.reasoning_tokens == thought < r.usage.output_tokens == n
        events = list(client.responses.create(stream=True, **body))
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Seven is early."
        assert events[-1].response.output[0].content[0].text == "Seven is early."


# --------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "background": True, "store": False}, "background"),
    ({"input": "x", "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}}},
     "text.format.json_schema.schema"),
    ({"input": "x", "reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x", "nonsense": 1}, "nonsense"),
    ({}, "input"),
])
def test_bad_requests_are_400s_naming_the_field(server, body, param):
    assert_error(server.post("/v1/responses", json=body), 400, param)
