"""Tools and the Responses API combined with the other issues' features: tools in a chat with images (the
template gets both), and the responses store with several models in one server (one store per server)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

import imagekit
import visionkit
from apikit import api_client, assert_error, multi_client

ALARM = {"type": "function", "function": {
    "name": "set_alarm", "description": "Set an alarm.",
    "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                                    "on": {"type": "boolean"}},
                   "required": ["hour", "on"], "additionalProperties": False}}}
#: the tiny Llava's template with a tools section, as a tools-aware vision template has one
TOOLS_TEMPLATE = ("{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
                  "<|im_end|>\n{% endif %}")


# --------------------------------------------------------------------------- images and tools


def test_tools_and_images_render_together_and_calls_stay_valid(tiny_llava):
    from patchbay_plugins.tinymodels.vision import LLAVA_CHAT_TEMPLATE

    template = TOOLS_TEMPLATE + LLAVA_CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "text", "text": "Wake me when this is done."},
                                             {"type": "image_url", "image_url": {"url": imagekit.png_url(40, 48, 1)}}]}]
    processor, _ = visionkit.hf_llava(tiny_llava)
    hf_messages, images = visionkit.to_hf(messages)
    text = processor.apply_chat_template(hf_messages, tools=[ALARM], chat_template=template,
                                         add_generation_prompt=True, tokenize=False)
    assert '"name": "set_alarm"' in text and "<image>" in text
    want_prompt = processor(text=text, images=images, return_tensors="pt")["input_ids"].shape[1]
    with api_client(tiny_llava, max_model_len=1024, trust_request_chat_template=True) as c:
        body = {"messages": messages, "tools": [ALARM], "chat_template": template, "temperature": 0,
                "max_tokens": 60}
        bare = c.post("/v1/chat/completions", json={**body, "tools": None, "max_tokens": 1}).json()
        none = c.post("/v1/chat/completions", json={**body, "tool_choice": "none", "max_tokens": 1}).json()
        assert none["usage"]["prompt_tokens"] == want_prompt > bare["usage"]["prompt_tokens"]
        for choice in ("required", {"type": "function", "function": {"name": "set_alarm"}}):
            r = c.post("/v1/chat/completions", json={**body, "tool_choice": choice, "parallel_tool_calls": False})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["usage"]["prompt_tokens"] == want_prompt
            (call,) = got["choices"][0]["message"]["tool_calls"]
            assert call["function"]["name"] == "set_alarm" and call["id"].startswith("call_")
            jsonschema.validate(json.loads(call["function"]["arguments"]), ALARM["function"]["parameters"])


# --------------------------------------------------------------------------- one responses store per server


@pytest.fixture(scope="module")
def two_models(tiny_tool_model, tiny_llama):
    with multi_client({"model": tiny_tool_model, "served_model_name": ("qwen",), "tool_call_parser": "hermes",
                       "enable_auto_tool_choice": True},
                      {"model": tiny_llama, "served_model_name": ("llama",)},
                      max_model_len=1024, responses_store_max_entries=20) as c:
        yield c


def test_one_store_serves_every_model(two_models):
    client = openai.OpenAI(base_url="http://testserver.local/v1", api_key="x", http_client=two_models, max_retries=0)
    first = client.responses.create(model="qwen", input="Hello there", max_output_tokens=6, temperature=0)
    assert client.responses.retrieve(first.id).model == "qwen"
    # continued on the other model: exactly as if the conversation had been sent to it as input
    more = client.responses.create(model="llama", previous_response_id=first.id, input="And then?",
                                   max_output_tokens=6, temperature=0)
    items = [{"role": "user", "content": "Hello there"}, *[o.model_dump(exclude_none=True) for o in first.output],
             {"role": "user", "content": "And then?"}]
    sent = client.responses.create(model="llama", input=items, max_output_tokens=6, temperature=0, store=False)
    assert more.usage.input_tokens == sent.usage.input_tokens and more.output_text == sent.output_text
    assert client.responses.retrieve(more.id).model == "llama"
    assert [i.type for i in client.responses.input_items.list(more.id, order="asc").data] == ["message"] * 3
    # the per-model tool parser follows the model a request names: "auto" is refused on llama, read on qwen
    tools = [{"type": "function", "name": "set_alarm", "parameters": ALARM["function"]["parameters"]}]
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        client.responses.create(model="llama", input="Alarm?", tools=tools, max_output_tokens=4)
    forced = '<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7, "on": true}}\n</tool_call>'
    call = client.responses.create(model="qwen", input="Alarm?", tools=tools, max_output_tokens=200,
                                   extra_body={"structured_outputs": {"choice": [forced]}})
    assert call.status == "completed" and [(o.type, o.name, json.loads(o.arguments)) for o in call.output] == [
        ("function_call", "set_alarm", {"hour": 7, "on": True})]
    client.responses.delete(first.id)
    assert_error(two_models.get(f"/v1/responses/{first.id}"), 404, "response_id")


def test_the_store_flags_are_server_wide(tmp_path):
    from patchbay.config import ConfigError, config_from_args

    path = tmp_path / "models.yaml"
    path.write_text("responses-store-max-entries: 7\nmodels:\n  - model: /a\n  - model: /b\n")
    top, _ = config_from_args(["--config", str(path)])
    assert top.responses_store_max_entries == 7 and {m.responses_store_max_entries for m in top.models} == {7}
    for key in ("responses-store: sqlite:/tmp/x.db", "responses-store-max-entries: 3",
                "responses-store-max-bytes: 1MiB"):
        path.write_text(f"models:\n  - model: /a\n  - model: /b\n    {key}\n")
        with pytest.raises(ConfigError, match=f"models\\[1\\].{key.split(':')[0]}.*server-wide"):
            config_from_args(["--config", str(path)])
