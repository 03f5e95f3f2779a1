"""Images end to end: real ``serve`` processes driven by the official openai and cohere clients — Llava chat
with data:, http (a loopback server the flags allow) and file:// images, equal to transformers; bad and hostile
URLs as 400s within the fetch time limit; CLIP text and image embeddings, Cohere image embed, image rerank."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

import imagekit
import visionkit
from serverkit import serve

pytestmark = pytest.mark.e2e

MAX_TOKENS = 8


def image_msg(url: str, text: str = "What is it?"):
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "local.png").write_bytes(imagekit.encode(imagekit.image(44, 40, 12)))
    return root


@pytest.fixture(scope="module")
def llava_server(tiny_llava, media_root, tmp_path_factory):
    args = [str(tiny_llava), "--served-model-name", "llava", "--max-model-len", "512", "--allowed-media-domains",
            "127.0.0.1", "--media-fetch-timeout", "2", "--allowed-local-media-path", str(media_root)]
    with serve(args, tmp_path_factory.mktemp("llava")) as server:
        yield server


def test_openai_client_chat_with_images(llava_server, tiny_llava, media_root):
    from openai import OpenAI

    client = OpenAI(base_url=llava_server.url + "/v1", api_key="none")
    png = imagekit.encode(imagekit.image(44, 40, 12))
    want = visionkit.hf_chat(tiny_llava, image_msg(imagekit.data_url(png)), MAX_TOKENS)

    def ask(url, stream=False):
        if not stream:
            r = client.chat.completions.create(model="llava", messages=image_msg(url), max_tokens=MAX_TOKENS,
                                               temperature=0)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens
        chunks = list(client.chat.completions.create(model="llava", messages=image_msg(url), max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return text, finish, chunks[-1].usage.prompt_tokens

    expected = (want["text"], want["finish_reason"], want["prompt_tokens"])
    assert ask(imagekit.data_url(png)) == expected
    assert ask(imagekit.data_url(png), stream=True) == expected
    with imagekit.http_server() as (base, routes):
        routes.add("/cat.png", png)
        routes.add("/redirect", status=302, headers={"Location": "/cat.png"})
        assert ask(base + "/cat.png") == expected
        assert ask(base + "/redirect") == expected
    assert ask(f"file://{media_root}/local.png") == expected


def test_openai_client_responses_with_input_image(llava_server, tiny_llava):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=llava_server.url + "/v1", api_key="none", max_retries=0)
    url = imagekit.png_url(38, 42, 14)
    want = visionkit.hf_chat(tiny_llava, image_msg(url), MAX_TOKENS)
    content = [{"type": "input_text", "text": "What is it?"}, {"type": "input_image", "image_url": url, "detail": "auto"}]
    r = client.responses.create(model="llava", input=[{"role": "user", "content": content}],
                                max_output_tokens=MAX_TOKENS, temperature=0)
    assert (r.output_text, r.usage.input_tokens) == (want["text"], want["prompt_tokens"])
    events = list(client.responses.create(model="llava", input=[{"role": "user", "content": content}],
                                          max_output_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want["text"]
    assert events[-1].response.usage.input_tokens == want["prompt_tokens"]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="llava", max_output_tokens=2, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://169.254.169.254/latest/meta-data/"}]}])
    assert info.value.body["param"] == "input[0].content[0]"


def test_concurrent_chats_with_different_images(llava_server, tiny_llava):
    from openai import OpenAI

    client = OpenAI(base_url=llava_server.url + "/v1", api_key="none")
    urls = [imagekit.png_url(30 + 3 * i, 34, 80 + i) for i in range(6)]
    got = [None] * len(urls)

    def run(i):
        r = client.chat.completions.create(model="llava", messages=image_msg(urls[i]), max_tokens=MAX_TOKENS,
                                           temperature=0)
        got[i] = r.choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [visionkit.hf_chat(tiny_llava, image_msg(u), MAX_TOKENS)["text"] for u in urls]


def test_bad_and_hostile_urls_are_400s_and_the_server_stays_healthy(llava_server, media_root):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=llava_server.url + "/v1", api_key="none", max_retries=0)
    with imagekit.http_server() as (base, routes):
        routes.add("/slow.png", imagekit.encode(imagekit.image(8, 8, 1)), delay=6.0)
        routes.add("/html", b"<html></html>", headers={"Content-Type": "text/html"})
        port = int(base.rsplit(":", 1)[1])
        cases = [
            (base + "/slow.png", "--media-fetch-timeout"),
            (base + "/missing.png", "HTTP 404"),
            (base + "/html", "not an image"),
            (f"http://localhost:{port}/x.png", "--allowed-media-domains"),  # not the listed host
            ("http://169.254.169.254/latest/meta-data/", "--allowed-media-domains"),
            (f"file://{media_root}/../secret.png", "outside"),
            (imagekit.data_url(imagekit.bomb_png()), "pixels"),
            ("data:image/png;base64,****", "base64"),
        ]
        for url, contains in cases:
            start = time.monotonic()
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="llava", messages=image_msg(url), max_tokens=2)
            assert time.monotonic() - start < 5.0, url
            err = info.value.body
            assert contains in err["message"] and err["param"] == "messages[0].content[1]", err
        assert "/slow.png" in routes.hits and not any(h.startswith("/x.png") for h in routes.hits)
    assert httpx.get(llava_server.url + "/health").status_code == 200
    r = client.chat.completions.create(model="llava", messages=image_msg(imagekit.png_url()), max_tokens=2)
    assert r.choices[0].finish_reason == "length"


# --------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_server(tiny_clip, tmp_path_factory):
    with serve([str(tiny_clip), "--served-model-name", "clip"], tmp_path_factory.mktemp("clip")) as server:
        yield server


def test_clip_embeddings_rerank_and_cohere_embed(clip_server, tiny_clip):
    import cohere
    from openai import OpenAI

    from test_vision_pooling import close, hf_image, hf_text

    client = OpenAI(base_url=clip_server.url + "/v1", api_key="none")
    texts = ["a cat", "two dogs"]
    got = client.embeddings.create(model="clip", input=texts)  # base64 on the wire
    for item, text in zip(got.data, texts):
        close(item.embedding, hf_text(tiny_clip, text))
    url = imagekit.png_url(40, 48, 1)
    r = httpx.post(clip_server.url + "/v1/embeddings", json={
        "model": "clip", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        "encoding_format": "float"})
    assert r.status_code == 200, r.text
    close(r.json()["data"][0]["embedding"], hf_image(tiny_clip, url))

    co = cohere.ClientV2(base_url=clip_server.url, api_key="none")
    out = co.embed(model="clip", images=[url], input_type="image", embedding_types=["float"])
    close(out.embeddings.float_[0], hf_image(tiny_clip, url))
    out = co.embed(model="clip", inputs=[{"content": [{"type": "image_url", "image_url": {"url": url}}]},
                                         {"content": [{"type": "text", "text": "a cat"}]}],
                   input_type="search_document", embedding_types=["float"])
    close(out.embeddings.float_[0], hf_image(tiny_clip, url))
    close(out.embeddings.float_[1], hf_text(tiny_clip, "a cat"))

    docs = [{"content": [{"type": "image_url", "image_url": {"url": imagekit.png_url(32, 32, s)}}]} for s in range(3)]
    r = httpx.post(clip_server.url + "/v2/rerank", json={"model": "clip", "query": "a cat", "documents": docs,
                                                          "top_n": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert "document" not in results[0]


# --------------------------------------------------------------------------- several models, one with images


@pytest.fixture(scope="module")
def multi_server(tiny_llava, tiny_clip, tiny_llama, media_root, tmp_path_factory):
    """``serve --config``: a Llava (its own media flags), a CLIP and a text-only llama side by side."""
    import textwrap

    tmp = tmp_path_factory.mktemp("multi-vision")
    (tmp / "serve.yaml").write_text(textwrap.dedent(f"""
        cpu-threads: 1
        models:
          - model: {tiny_llava}
            served-model-name: llava
            max-model-len: 512
            limit-mm-per-prompt: {{"image": 2}}
            allowed-local-media-path: {media_root}
          - model: {tiny_clip}
            served-model-name: clip
          - model: {tiny_llama}
            served-model-name: text
            max-model-len: 256
    """))
    with serve(["--config", str(tmp / "serve.yaml")], tmp) as server:
        yield server


def test_config_with_several_models_one_of_them_llava(multi_server, tiny_llava, tiny_clip, media_root):
    import openai
    from openai import OpenAI

    from test_vision_pooling import close, hf_image

    client = OpenAI(base_url=multi_server.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["llava", "clip", "text"]
    url = imagekit.png_url(40, 48, 1)
    want = visionkit.hf_chat(tiny_llava, image_msg(url), MAX_TOKENS)
    for image in (url, f"file://{media_root}/local.png"):
        r = client.chat.completions.create(model="llava", messages=image_msg(image), max_tokens=MAX_TOKENS,
                                           temperature=0)
        assert r.usage.prompt_tokens == want["prompt_tokens"]  # the same placeholders for any image
        if image == url:
            assert r.choices[0].message.content == want["text"]
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": imagekit.png_url(seed=s)}}
                                          for s in range(3)]}]
    with pytest.raises(openai.BadRequestError) as info:  # the llava entry's own --limit-mm-per-prompt
        client.chat.completions.create(model="llava", messages=three, max_tokens=2)
    assert info.value.body["param"] == "messages[0].content[2]"
    with pytest.raises(openai.BadRequestError) as info:  # the text model takes no images
        client.chat.completions.create(model="text", messages=image_msg(url), max_tokens=2)
    assert info.value.body["param"] == "messages[0].content[1].type"
    r = client.chat.completions.create(model="text", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    r = httpx.post(multi_server.url + "/v1/embeddings", json={"model": "clip", "encoding_format": "float", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    close(r.json()["data"][0]["embedding"], hf_image(tiny_clip, url))
    metrics = httpx.get(multi_server.url + "/metrics").text
    assert 'vllm:prompt_tokens_total{model_name="llava"}' in metrics
    assert 'vllm:mm_cache_queries_total{model_name="clip"} 1.0' in metrics
    assert httpx.get(multi_server.url + "/health").status_code == 200
