"""Chat with images on the tiny Llava, in process: answers equal transformers' greedy generate (streamed or not,
through chunked prefill cutting images, preemption and the caches); images never share KV blocks by token ids
alone; a repeated image is not encoded again; every bad image is a 400 and the server stays healthy."""

from __future__ import annotations

import json
import threading
import time

import pytest

import imagekit
import visionkit
from apikit import api_client, assert_error, sse_events

MAX_TOKENS = 10


def ask(client, messages, **extra):
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def answer(resp):
    choice = resp["choices"][0]
    return {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "prompt_tokens": resp["usage"]["prompt_tokens"], "completion_tokens": resp["usage"]["completion_tokens"]}


def user(*parts):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": p}} if p.startswith("data:") else {"type": "text", "text": p}
        for p in parts]}]


@pytest.fixture(scope="module")
def oracle(tiny_llava):
    cache = {}

    def want(messages):
        key = json.dumps(messages)
        if key not in cache:
            cache[key] = visionkit.hf_chat(tiny_llava, messages, MAX_TOKENS)
        return cache[key]

    return want


@pytest.fixture(scope="module")
def client(tiny_llava):
    with api_client(tiny_llava, max_model_len=512) as c:
        yield c


def test_answers_equal_transformers(client, oracle):
    for messages in visionkit.conversations():
        got = answer(ask(client, messages))
        assert got == oracle(messages)
        events = sse_events(client.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}).text)
        chunks = [e for e in events if e != "[DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        assert (text, finish, chunks[-1]["usage"]["prompt_tokens"]) == (got["text"], got["finish_reason"],
                                                                        got["prompt_tokens"])


def test_placeholders_are_counted_and_tokenize_agrees(client, oracle):
    messages = user("Two of them:", imagekit.png_url(40, 48, 7), imagekit.png_url(33, 35, 8))
    got = answer(ask(client, messages))
    text_only = answer(ask(client, user("Two of them:")))
    assert got["prompt_tokens"] == oracle(messages)["prompt_tokens"]
    # each image: its own <image> token plus a newline in the template, expanded to 16 placeholders
    assert got["prompt_tokens"] - text_only["prompt_tokens"] >= 2 * 16
    tok = client.post("/tokenize", json={"messages": messages}).json()
    assert tok["count"] == got["prompt_tokens"] and tok["tokens"].count(5) == 32


def test_concurrent_requests_with_different_images_answer_as_one_at_a_time(client, oracle):
    chats = [user("Look:", imagekit.png_url(30 + i, 40, 20 + i)) for i in range(6)]
    results = [None] * len(chats)

    def run(i):
        results[i] = answer(ask(client, chats[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [oracle(c) for c in chats]
    assert len({r["text"] for r in results}) > 1  # the images matter


@pytest.mark.parametrize("cache_tokens", [0, 8192])
def test_chunked_prefill_cutting_through_images(tiny_llava, oracle, cache_tokens):
    """Chunks of 7 tokens cut each 16-placeholder image into pieces; without an encoder cache each piece
    encodes its image again, with one the image is encoded once."""
    messages = visionkit.conversations()[1]
    with api_client(tiny_llava, max_model_len=512, max_num_batched_tokens=7, block_size=4,
                    encoder_cache_tokens=cache_tokens) as c:
        assert answer(ask(c, messages)) == oracle(messages)
        cache = c.model.engine.runner.images.cache
        if cache_tokens:
            assert cache.misses == 2 and cache.hits >= 4
        else:
            assert cache.hits == 0 and cache.misses >= 6


def test_preempted_sequences_are_recomputed_with_their_images(tiny_llava, oracle):
    chats = [user("Picture", imagekit.png_url(36, 36, 40 + i), "what now?") for i in range(4)]
    with api_client(tiny_llava, max_model_len=128, block_size=4, kv_cache_memory=64 * 1024,
                    max_num_batched_tokens=64, encoder_cache_tokens=0) as c:
        results = [None] * len(chats)

        def run(i):
            results[i] = answer(ask(c, chats[i], max_tokens=MAX_TOKENS))

        gate = threading.Event()
        c.model.engine.call(lambda: gate.wait(30))  # the four reach the engine together (a quiet machine
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chats))]  # finished one first)
        for t in threads:
            t.start()
        time.sleep(1.0)
        gate.set()
        for t in threads:
            t.join()
        assert c.model.stats().preemptions > 0, "the test meant to force preemption did not"
    assert results == [oracle(m) for m in chats]


def test_same_tokens_different_images_never_share_kv_blocks(tiny_llava, oracle, monkeypatch):
    """Two prompts with equal token ids and different images: the second must not reuse the first's image
    blocks. The negative control (image hashes left out of the keys) gives the wrong answer, so this test can
    fail."""
    first = user("Same words here.", imagekit.png_url(40, 40, 60), "And more words after the image.")
    second = user("Same words here.", imagekit.png_url(40, 40, 61), "And more words after the image.")
    want = oracle(second)
    assert want["text"] != oracle(first)["text"]
    with api_client(tiny_llava, max_model_len=512, block_size=4) as c:
        ask(c, first)
        resp = ask(c, second)
        assert answer(resp) == want
        cached = resp["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
        assert 0 < cached < 16  # the text blocks before the image are shared, nothing from the image on
        again = ask(c, second)  # the same image again: its blocks are reused now
        assert answer(again) == want
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 16

    import patchbay.engine.scheduler as scheduler

    monkeypatch.setattr(scheduler, "block_extra", lambda mm, bs: None)
    with api_client(tiny_llava, max_model_len=512, block_size=4) as c:
        ask(c, first)
        assert answer(ask(c, second))["text"] != want["text"]


def test_a_repeated_image_is_not_encoded_again(client, oracle):
    from serverkit import parse_metrics

    img = imagekit.png_url(45, 45, 70)
    cache = client.model.engine.runner.images.cache
    ask(client, user("First question about", img))
    misses, hits = cache.misses, cache.hits
    before = parse_metrics(client.get("/metrics").text)
    messages = user("A different question entirely, about", img)  # new prefix: no KV block is shared
    assert answer(ask(client, messages)) == oracle(messages)
    assert cache.misses == misses and cache.hits == hits + 1
    after = parse_metrics(client.get("/metrics").text)
    assert after["mm_cache_hits_total"] - before["mm_cache_hits_total"] == 1
    assert after["mm_cache_queries_total"] - before["mm_cache_queries_total"] == 1


def test_openapi_documents_image_parts(client, oracle):
    """/openapi.json gives image parts their shape (the field is checked by hand, so it declares it); both
    forms it names are taken."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    forms = schemas["ContentPart"]["properties"]["image_url"]["anyOf"]
    assert forms[0]["required"] == ["url"] and forms[0]["properties"]["detail"]["enum"] == ["auto", "low", "high"]
    assert [f.get("type") for f in forms[1:]] == ["string", "null"]
    messages = visionkit.conversations()[0]
    bare = [{"role": "user", "content": [p if p["type"] == "text" else {"type": "image_url",
                                                                          "image_url": p["image_url"]["url"]}
                                         for p in messages[0]["content"]]}]
    assert answer(ask(client, bare)) == oracle(messages)
    # vLLM also takes the Responses API's part in chat messages
    responses_style = [{"role": "user", "content": [
        p if p["type"] == "text" else {"type": "input_image", "image_url": p["image_url"]["url"], "detail": "high"}
        for p in messages[0]["content"]]}]
    assert answer(ask(client, responses_style)) == oracle(messages)


# --------------------------------------------------------------------------- images with tools

#: the tiny Llava's template with a tools preamble (its own renders no tools)
TOOLS_TEMPLATE = ("{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t['function']['name'] }}: "
                  "{{ t['function']['description'] }}; {% endfor %}<|im_end|>\n{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather where the picture was taken.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}


def test_images_with_tools(tiny_llava):
    """Tools and images in one render (the render thread gets both): with tool_choice none the answer is
    transformers' over the same template with the same tools; required gives a call valid against its schema
    from the same prompt (images placed, the same count), streamed or not."""
    import jsonschema
    from patchbay_plugins.tinymodels.vision import LLAVA_CHAT_TEMPLATE

    template = TOOLS_TEMPLATE + LLAVA_CHAT_TEMPLATE
    messages = user("Where is this?", imagekit.png_url(40, 44, 90))
    other = user("Where is this?", imagekit.png_url(40, 44, 91))
    with api_client(tiny_llava, max_model_len=512, chat_template=template) as c:
        for m in (messages, other):
            got = answer(ask(c, m, tools=[WEATHER], tool_choice="none"))
            assert got == visionkit.hf_chat(tiny_llava, m, MAX_TOKENS, tools=[WEATHER], chat_template=template)
        no_tools = answer(ask(c, messages))
        assert got["prompt_tokens"] > no_tools["prompt_tokens"]  # the tools are in the prompt
        resp = ask(c, messages, tools=[WEATHER], tool_choice="required", max_tokens=60)
        call = resp["choices"][0]["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
        assert resp["usage"]["prompt_tokens"] == got["prompt_tokens"]
        events = sse_events(c.post("/v1/chat/completions", json={
            "messages": messages, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 60, "temperature": 0,
            "stream": True}).text)
        streamed = "".join(tc["function"].get("arguments") or "" for e in events if e != "[DONE]"
                           for ch in e["choices"] for tc in ch["delta"].get("tool_calls") or [])
        assert streamed == call["function"]["arguments"]
        tok = c.post("/tokenize", json={"messages": messages, "tools": [WEATHER]}).json()
        assert tok["count"] == got["prompt_tokens"]


# --------------------------------------------------------------------------- the Responses API


def responses_input(messages):
    """Chat messages with image_url parts as Responses input items (input_text / input_image parts)."""
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [
        {"type": "input_image", "image_url": p["image_url"]["url"]} if p["type"] == "image_url"
        else {"type": "input_text", "text": p["text"]} for p in m["content"]]} for m in messages]


def test_responses_take_input_image_parts(client, oracle):
    """input_image parts go the chat path's way: the same answer as transformers (and as chat), streamed too."""
    for messages in visionkit.conversations():
        r = client.post("/v1/responses", json={"input": responses_input(messages), "max_output_tokens": MAX_TOKENS,
                                               "temperature": 0})
        assert r.status_code == 200, r.text
        body, want = r.json(), oracle(messages)
        text = "".join(p["text"] for item in body["output"] if item["type"] == "message" for p in item["content"])
        assert (text, body["usage"]["input_tokens"]) == (want["text"], want["prompt_tokens"])
    text = client.post("/v1/responses", json={"input": responses_input(messages), "stream": True,
                                              "max_output_tokens": MAX_TOKENS, "temperature": 0}).text
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == want["text"]
    listed = client.get(f"/v1/responses/{body['id']}/input_items").json()["data"]
    assert any(p["type"] == "input_image" for item in listed for p in item.get("content") or [])


def test_responses_continue_a_conversation_with_its_images(client, oracle):
    first = responses_input(user("Remember this:", imagekit.png_url(36, 40, 95)))
    r = client.post("/v1/responses", json={"input": first, "max_output_tokens": MAX_TOKENS, "temperature": 0})
    head = r.json()
    said = "".join(p["text"] for item in head["output"] if item["type"] == "message" for p in item["content"])
    again = client.post("/v1/responses", json={"previous_response_id": head["id"], "input": "And now?",
                                               "max_output_tokens": MAX_TOKENS, "temperature": 0}).json()
    whole = [*user("Remember this:", imagekit.png_url(36, 40, 95)), {"role": "assistant", "content": said},
             {"role": "user", "content": "And now?"}]
    assert again["usage"]["input_tokens"] == oracle(whole)["prompt_tokens"]


def test_responses_truncation_drops_turns_and_fetches_each_image_once(client, tiny_llava):
    """truncation: auto renders again without the oldest turn; the image still in the prompt is not fetched
    again (a loopback server counts the downloads)."""
    pngs = {"/a.png": imagekit.encode(imagekit.image(40, 40, 96)), "/b.png": imagekit.encode(imagekit.image(40, 40, 97))}
    turns = [{"role": "user", "content": [{"type": "text", "text": "First:"}, {"type": "image_url", "image_url": {
        "url": imagekit.data_url(pngs["/a.png"])}}]},
             {"role": "assistant", "content": "A field."},
             {"role": "user", "content": [{"type": "text", "text": "Then:"}, {"type": "image_url", "image_url": {
                 "url": imagekit.data_url(pngs["/b.png"])}}]}]
    whole = client.post("/tokenize", json={"messages": turns}).json()["count"]
    kept = client.post("/tokenize", json={"messages": turns[1:]}).json()["count"]
    with imagekit.http_server() as (base, routes):
        for path, png in pngs.items():
            routes.add(path, png)
        turns[0]["content"][1]["image_url"]["url"] = base + "/a.png"
        turns[2]["content"][1]["image_url"]["url"] = base + "/b.png"
        with api_client(tiny_llava, max_model_len=(whole + kept) // 2, allowed_media_domains=("127.0.0.1",)) as c:
            body = {"input": responses_input(turns), "max_output_tokens": 2, "temperature": 0}
            assert_error(c.post("/v1/responses", json=body), 400, "input")
            routes.hits.clear()
            r = c.post("/v1/responses", json={**body, "truncation": "auto"})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["input_tokens"] == kept
            assert sorted(routes.hits) == ["/a.png", "/b.png"]


BAD_RESPONSES = [
    ([{"type": "input_text", "text": "x"}, {"type": "input_image", "image_url": "data:image/png;base64,%%%"}],
     "input[1].content[1]", "base64"),
    ([{"type": "input_image", "file_id": "file-abc"}], "input[1].content[0].file_id", "Files API"),
    ([{"type": "input_image"}], "input[1].content[0].image_url", "image_url"),
    ([{"type": "input_image", "image_url": {"url": imagekit.png_url()}}], "input[1].content[0].image_url", "string"),
    ([{"type": "input_image", "image_url": imagekit.png_url(), "detail": "max"}],
     "input[1].content[0].image_url.detail", "detail"),
    ([{"type": "input_file", "file_id": "file-abc"}], "input[1].content[0].type", "input_image"),
]


@pytest.mark.parametrize("content,param,contains", BAD_RESPONSES, ids=[f"bad{i}" for i in range(len(BAD_RESPONSES))])
def test_responses_bad_images_name_the_input_item(client, content, param, contains):
    """The param names the item of ``input`` (here the second: instructions and a first message come before)."""
    r = client.post("/v1/responses", json={"instructions": "Be brief.", "max_output_tokens": 2, "input": [
        {"role": "user", "content": "first"}, {"role": "user", "content": content}]})
    assert_error(r, 400, param, contains=contains)


def test_responses_images_on_a_text_only_model(tiny_llama):
    with api_client(tiny_llama) as c:
        r = c.post("/v1/responses", json={"input": responses_input(user("hi", imagekit.png_url())),
                                          "max_output_tokens": 2})
        assert_error(r, 400, "input[0].content[1].type", contains="text only")


# --------------------------------------------------------------------------- bad input


BAD = [
    (user("x", "data:image/png;base64,%%%"), "messages[0].content[1]", "base64"),
    (user("x", imagekit.data_url(b"definitely not an image")), "messages[0].content[1]", "not an image"),
    (user("x", imagekit.data_url(imagekit.encode(imagekit.image(64, 64, 1))[:300])), "messages[0].content[1]",
     "truncated"),
    (user("x", imagekit.data_url(imagekit.bomb_png())), "messages[0].content[1]", "pixels"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}]}],
     "messages[0].content[0]", "scheme"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
     "messages[0].content[0]", "--allowed-local-media-path"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x"}}]}],
     "messages[0].content[0]", "metadata"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0].image_url.url",
     "image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": imagekit.png_url(), "detail": "max"}}]}],
     "messages[0].content[0].image_url.detail", "detail"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": {"url": imagekit.png_url()}}]}],
     "messages[0].content[0].image_url", "input_image"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": imagekit.png_url(), "detail": "max"}]}],
     "messages[0].content[0].detail", "detail"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": imagekit.png_url(), "detail": "low"}]}],
     "messages[0].content[0].detail", "inside image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": imagekit.png_url()}},
                                   {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}],
     "messages[0].content[1].type", "takes text and image_url parts"),
    ([{"role": "user", "content": [{"type": "text", "text": "a literal <image> token"},
                                   {"type": "image_url", "image_url": {"url": imagekit.png_url()}}]}],
     "messages", "placeholder"),
]


@pytest.mark.parametrize("messages,param,contains", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_images_are_400s_and_the_server_stays_healthy(client, oracle, messages, param, contains):
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    assert_error(r, 400, param, contains=contains)
    good = visionkit.conversations()[0]
    assert answer(ask(client, good)) == oracle(good)


def test_media_limits_at_the_endpoint(tiny_llava):
    """The hardening limits around images: a body over --max-request-body-size is a 413 before anything is
    decoded; an inline or downloaded image over --max-media-bytes, or over --max-image-pixels, a 400 naming the
    part; the server answers the next request."""
    from PIL import Image

    big = imagekit.encode(imagekit.image(200, 200, 3))  # noise: ~100 KB
    mid = imagekit.encode(imagekit.image(90, 90, 4))
    wide = imagekit.encode(Image.new("RGB", (200, 60), (10, 200, 30)))  # 12,000 pixels in a few hundred bytes
    assert len(big) > 64 * 1024 and 20_000 < len(mid) < 40_000 and len(wide) < 1000
    with api_client(tiny_llava, max_model_len=512, max_request_body_bytes=64 * 1024, max_media_bytes=20_000,
                    max_image_pixels=10_000, allowed_media_domains=("127.0.0.1",)) as c:
        def chat(url):
            content = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]
            return c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                        "max_tokens": 2})

        assert_error(chat(imagekit.data_url(big)), 413)
        assert_error(chat(imagekit.data_url(mid)), 400, "messages[0].content[1]", contains="--max-media-bytes")
        assert_error(chat(imagekit.data_url(wide)), 400, "messages[0].content[1]", contains="--max-image-pixels")
        with imagekit.http_server() as (base, routes):
            routes.add("/mid.png", mid)
            assert_error(chat(base + "/mid.png"), 400, "messages[0].content[1]", contains="--max-media-bytes")
        assert chat(imagekit.png_url(40, 40, 5)).status_code == 200


def test_image_limit_per_prompt(tiny_llava):
    with api_client(tiny_llava, max_model_len=512, limit_mm_per_prompt={"image": 1}) as c:
        r = c.post("/v1/chat/completions", json={"messages": user(imagekit.png_url(), imagekit.png_url(seed=2)),
                                                 "max_tokens": 2})
        assert_error(r, 400, "messages[0].content[1]", contains="--limit-mm-per-prompt")


def test_images_sent_to_a_text_only_model(tiny_llama):
    with api_client(tiny_llama) as c:
        r = c.post("/v1/chat/completions", json={"messages": user("hi", imagekit.png_url()), "max_tokens": 2})
        assert_error(r, 400, "messages[0].content[1].type", contains="text only")


def test_a_folder_with_the_older_layout_loads_and_answers_the_same(tiny_llava, oracle, tmp_path):
    """transformers 4's Llava checkpoints (``language_model.model.*``, ``vision_tower.vision_model.*``) whose chat
    template is only the processor's ``chat_template.json`` and with no processor_config.json."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    old = tmp_path / "llava-old"
    shutil.copytree(tiny_llava, old)
    template = (old / "chat_template.jinja").read_text()
    (old / "chat_template.jinja").unlink()
    (old / "processor_config.json").unlink()
    (old / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    renamed = {}
    for name, t in load_file(old / "model.safetensors").items():
        if name.startswith("model.language_model."):
            name = "language_model.model." + name[len("model.language_model."):]
        elif name == "lm_head.weight":
            name = "language_model.lm_head.weight"
        elif name.startswith("model.vision_tower."):
            name = "vision_tower.vision_model." + name[len("model.vision_tower."):]
        elif name.startswith("model."):
            name = name[len("model."):]
        renamed[name] = t.clone()
    renamed["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(renamed, old / "model.safetensors", metadata={"format": "pt"})
    messages = visionkit.conversations()[0]
    with api_client(old, max_model_len=512) as c:
        assert answer(ask(c, messages)) == oracle(messages)


def test_a_string_format_template_gets_the_image_token_before_the_text(tiny_llava):
    with api_client(tiny_llava, max_model_len=512, chat_template_content_format="string") as c:
        messages = user("Describe:", imagekit.png_url(40, 48, 1))
        tok = c.post("/tokenize", json={"messages": messages, "return_token_strs": True}).json()
        text = c.model.tokenizer.decode(tok["tokens"], skip_special_tokens=False)
        assert "user\n" + "<image>" * 16 + "\nDescribe:<|im_end|>" in text
        assert ask(c, messages)["usage"]["prompt_tokens"] == tok["count"]
