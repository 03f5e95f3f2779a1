"""Every OpenAI / vLLM request parameter of the text API, each observed doing what it says."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from apikit import api_client, assert_error

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "Tell me about the river."}]
PROMPT = "The old river ran"


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama) as c:
        yield c


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def hf_next_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)


def comp(client, **body):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **body}
    r = client.post(COMP, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(choice) -> list[int]:
    """Token ids of a completions choice asked with logprobs=0, return_tokens_as_token_ids."""
    return [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]


def ids_of(client, **body) -> list[int]:
    return token_ids(comp(client, logprobs=0, return_tokens_as_token_ids=True, **body)["choices"][0])


def prompt_ids(client, text=PROMPT) -> list[int]:
    return client.model.encode(text)


# --------------------------------------------------------------------------- logit shaping


def test_logit_bias_forces_a_token(client):
    assert ids_of(client, logit_bias={"77": 100}) == [77] * 8


def test_allowed_token_ids_restrict_the_output(client):
    allowed = [10, 20, 30, 40]
    for seed in range(3):
        got = ids_of(client, allowed_token_ids=allowed, temperature=1.0, seed=seed)
        assert set(got) <= set(allowed)


def test_bad_words_never_appear(client):
    first = ids_of(client)
    word = client.model.tokenizer.decode([first[0]]).strip()
    banned = {tuple(client.model.encode(w, add_special_tokens=False)) for w in (word, " " + word)}
    single = {b[0] for b in banned if len(b) == 1}
    assert single, "the first greedy token should be a one-token word"
    for seed in range(3):
        got = ids_of(client, bad_words=[word], temperature=1.0, seed=seed, max_tokens=16)
        assert not single & set(got)
    assert ids_of(client, bad_words=[word])[0] != first[0]


def test_min_tokens_holds_off_eos(client):
    eos = client.model.eos_token_ids[0]
    bias = {str(eos): 100}
    body = comp(client, logit_bias=bias, ignore_eos=False)
    assert body["usage"]["completion_tokens"] == 1 and body["choices"][0]["finish_reason"] == "stop"
    body = comp(client, logit_bias=bias, ignore_eos=False, min_tokens=5)
    assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["finish_reason"] == "stop"


def test_ignore_eos(client):
    eos = client.model.eos_token_ids[0]
    body = comp(client, logit_bias={str(eos): 100}, ignore_eos=True, max_tokens=5)
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"


def _penalised_argmax(hf, prompt, out, *, presence=0.0, frequency=0.0, repetition=1.0) -> int:
    logits = hf(torch.tensor([prompt + out])).logits[0, -1].float()
    if repetition != 1.0:
        seen = torch.tensor(sorted(set(prompt + out)))
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / repetition, vals * repetition)
    if out:
        counts = torch.bincount(torch.tensor(out), minlength=logits.shape[0]).float()
        logits -= counts * frequency + (counts > 0).float() * presence
    return int(logits.argmax())


@pytest.mark.parametrize("penalties", [
    {"presence_penalty": 1.5}, {"frequency_penalty": 2.0}, {"repetition_penalty": 3.0},
    {"presence_penalty": -1.0, "frequency_penalty": 0.5, "repetition_penalty": 1.3},
])
def test_penalties_match_an_independent_implementation(client, hf, penalties):
    prompt = prompt_ids(client)
    got = ids_of(client, max_tokens=12, **penalties)
    plain = ids_of(client, max_tokens=12)
    assert got != plain, "the penalty should change the greedy path"
    kw = {"presence": penalties.get("presence_penalty", 0.0), "frequency": penalties.get("frequency_penalty", 0.0),
          "repetition": penalties.get("repetition_penalty", 1.0)}
    with torch.inference_mode():
        for i in range(len(got)):
            assert got[i] == _penalised_argmax(hf, prompt, got[:i], **kw), f"step {i}"


def test_top_k_1_min_p_1_and_tiny_top_p_are_greedy(client):
    greedy = ids_of(client)
    assert ids_of(client, temperature=1.0, top_k=1, seed=1) == greedy
    assert ids_of(client, temperature=1.0, min_p=1.0, seed=2) == greedy
    assert ids_of(client, temperature=1.0, top_p=1e-6, seed=3) == greedy
    assert ids_of(client, temperature=1.0, seed=4) != greedy


# --------------------------------------------------------------------------- logprobs


def test_logprobs_equal_an_independent_log_softmax(client, hf):
    body = comp(client, logprobs=3, return_tokens_as_token_ids=True)
    lp = body["choices"][0]["logprobs"]
    ids = token_ids(body["choices"][0])
    context = prompt_ids(client)
    for i, token in enumerate(ids):
        ref = hf_next_logprobs(hf, context + ids[:i])
        assert math.isclose(lp["token_logprobs"][i], float(ref[token]), abs_tol=1e-4)
        top = lp["top_logprobs"][i]
        values, best = ref.topk(3)
        for t, v in zip(best.tolist(), values.tolist()):
            assert math.isclose(top[f"token_id:{t}"], v, abs_tol=1e-4)
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_logprobs_after_processors(client, hf):
    """Logprobs are taken after the processors the request asked for (here: a bias)."""
    body = comp(client, logprobs=0, return_tokens_as_token_ids=True, logit_bias={"5": 3.0}, max_tokens=3)
    ids = token_ids(body["choices"][0])
    ref = hf(torch.tensor([prompt_ids(client)])).logits[0, -1].float().detach()
    ref[5] += 3.0
    assert math.isclose(body["choices"][0]["logprobs"]["token_logprobs"][0],
                        float(torch.log_softmax(ref, -1)[ids[0]]), abs_tol=1e-4)


def test_chat_logprobs_shape(client):
    r = client.post(CHAT, json={"messages": MSG, "max_tokens": 4, "temperature": 0, "logprobs": True,
                                "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(item["top_logprobs"]) == 2 and item["logprob"] <= 0
        assert bytes(item["bytes"]).decode("utf-8", errors="replace") == item["token"]
        assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][1]["logprob"]


def test_logprobs_are_capped(client):
    assert_error(client.post(COMP, json={"prompt": "x", "logprobs": 21}), 400, "logprobs")
    assert_error(client.post(CHAT, json={"messages": MSG, "logprobs": True, "top_logprobs": 21}), 400, "top_logprobs")
    assert_error(client.post(CHAT, json={"messages": MSG, "top_logprobs": 2}), 400, "top_logprobs")
    assert_error(client.post(COMP, json={"prompt": "x", "prompt_logprobs": 99}), 400, "prompt_logprobs")


def test_prompt_logprobs_and_echo(client, hf):
    context = prompt_ids(client)
    body = comp(client, prompt_logprobs=2, max_tokens=2)
    plp = body["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(context)
    for i in range(1, len(context)):
        ref = hf_next_logprobs(hf, context[:i])
        entry = plp[i][str(context[i])]
        assert math.isclose(entry["logprob"], float(ref[context[i]]), abs_tol=1e-4)
        assert entry["rank"] == int((ref > ref[context[i]]).sum()) + 1
    echoed = comp(client, echo=True, logprobs=1, max_tokens=3)["choices"][0]
    lp = echoed["logprobs"]
    assert echoed["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == len(context) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert math.isclose(lp["token_logprobs"][1], plp[1][str(context[1])]["logprob"], abs_tol=1e-5)


# --------------------------------------------------------------------------- candidates


def test_best_of_keeps_the_highest_scoring_candidate(client):
    body = dict(temperature=1.0, seed=11, max_tokens=6, logprobs=0, return_tokens_as_token_ids=True)
    four = comp(client, n=4, **body)["choices"]
    scores = [sum(c["logprobs"]["token_logprobs"]) for c in four]
    best = comp(client, n=1, best_of=4, **body)["choices"][0]
    assert best["text"] == four[scores.index(max(scores))]["text"]
    assert_error(client.post(COMP, json={"prompt": "x", "n": 3, "best_of": 2}), 400, "best_of")
    assert_error(client.post(COMP, json={"prompt": "x", "best_of": 3, "stream": True}), 400, "best_of")


def reference_beam_search(hf, prompt, width, max_tokens, eos, length_penalty=1.0):
    live = [([], 0.0)]
    done = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            grown = []
            for tokens, cum in live:
                lp = hf_next_logprobs(hf, prompt + tokens)
                values, ids = lp.topk(2 * width)
                for t, v in zip(ids.tolist(), values.tolist()):
                    if t in eos:
                        done.append((tokens + [t], cum + v))
                    else:
                        grown.append((tokens + [t], cum + v))
            grown.sort(key=lambda b: b[1], reverse=True)
            live = grown[:width]
    ranked = sorted(done + live, key=lambda b: b[1] / len(b[0]) ** length_penalty, reverse=True)
    return [b[0] for b in ranked[:width]]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_equals_a_reference(client, hf, length_penalty):
    prompt = prompt_ids(client)
    body = comp(client, use_beam_search=True, n=3, max_tokens=5, logprobs=0, return_tokens_as_token_ids=True,
                ignore_eos=False, length_penalty=length_penalty)
    got = [token_ids(c) for c in body["choices"]]
    expected = reference_beam_search(hf, prompt, 3, 5, set(client.model.eos_token_ids), length_penalty)
    assert got == expected
    chat = client.post(CHAT, json={"messages": MSG, "use_beam_search": True, "n": 2, "max_tokens": 4})
    assert chat.status_code == 200 and len(chat.json()["choices"]) == 2


def test_seeded_output_is_unchanged_by_batching(client):
    alone = comp(client, temperature=1.0, seed=5, max_tokens=10)["choices"][0]["text"]
    batch = comp(client, prompt=["other prompt", PROMPT, "third"], temperature=1.0, seed=5, max_tokens=10)
    assert batch["choices"][1]["text"] == alone


# --------------------------------------------------------------------------- text shaping


def test_stop_strings_with_and_without_include(client):
    text = comp(client, max_tokens=16)["choices"][0]["text"]
    stop = text[5:8]
    cut = text.find(stop)
    assert comp(client, max_tokens=16, stop=stop)["choices"][0]["text"] == text[:cut]
    assert comp(client, max_tokens=16, stop=stop, include_stop_str_in_output=True)["choices"][0]["text"] == \
        text[: cut + len(stop)]


def test_stop_token_ids(client):
    ids = ids_of(client, max_tokens=10)
    k = next(i for i in range(2, 10) if ids[i] not in ids[:i])
    body = comp(client, max_tokens=10, stop_token_ids=[ids[k]])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == ids[k]
    assert body["usage"]["completion_tokens"] == k + 1


def test_skip_and_space_special_tokens(client):
    start = client.model.tokenizer.convert_tokens_to_ids("<|im_start|>")
    bias = {str(start): 100}
    assert comp(client, logit_bias=bias, max_tokens=2)["choices"][0]["text"] == ""
    spaced = comp(client, logit_bias=bias, max_tokens=2, skip_special_tokens=False)["choices"][0]["text"]
    assert spaced == "<|im_start|> <|im_start|>"
    tight = comp(client, logit_bias=bias, max_tokens=2, skip_special_tokens=False,
                 spaces_between_special_tokens=False)["choices"][0]["text"]
    assert tight == "<|im_start|><|im_start|>"


def test_truncate_prompt_tokens(client):
    long = "word " * 50
    full = comp(client, prompt=long)["usage"]["prompt_tokens"]
    assert full > 10
    body = comp(client, prompt=long, truncate_prompt_tokens=10)
    assert body["usage"]["prompt_tokens"] == 10
    assert_error(client.post(COMP, json={"prompt": "x", "truncate_prompt_tokens": 0}), 400, "truncate_prompt_tokens")


def test_add_special_tokens(tiny_llama, tmp_path):
    model = tmp_path / "bos-model"
    shutil.copytree(tiny_llama, model)
    tok_path = model / "tokenizer.json"
    data = json.loads(tok_path.read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    tok_path.write_text(json.dumps(data))
    with api_client(model) as c:
        with_bos = comp(c)["usage"]["prompt_tokens"]
        without = comp(c, add_special_tokens=False)["usage"]["prompt_tokens"]
        assert with_bos == without + 1
        chat_default = c.post(CHAT, json={"messages": MSG, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
        chat_bos = c.post(CHAT, json={"messages": MSG, "max_tokens": 1, "add_special_tokens": True}).json()
        assert chat_bos["usage"]["prompt_tokens"] == chat_default + 1


# --------------------------------------------------------------------------- request plumbing


def test_request_id_flows_into_the_response(tiny_llama):
    with api_client(tiny_llama, enable_request_id_headers=True) as c:
        r = c.post(COMP, json={"prompt": "x", "max_tokens": 1, "request_id": "abc123"})
        assert r.json()["id"] == "cmpl-abc123" and r.headers["x-request-id"] == "abc123"
        r = c.post(CHAT, json={"messages": MSG, "max_tokens": 1}, headers={"X-Request-Id": "from-header"})
        assert r.json()["id"] == "chatcmpl-from-header" and r.headers["x-request-id"] == "from-header"
    with api_client(tiny_llama) as c:
        r = c.post(COMP, json={"prompt": "x", "max_tokens": 1, "request_id": "abc123"})
        assert r.json()["id"] == "cmpl-abc123" and "x-request-id" not in r.headers


def test_cache_salt_separates_prefix_caches(client):
    prompt = "shared prefix " * 12
    comp(client, prompt=prompt, max_tokens=1)
    again = comp(client, prompt=prompt, max_tokens=1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    salted = comp(client, prompt=prompt, max_tokens=1, cache_salt="tenant-b")
    assert "prompt_tokens_details" not in salted["usage"]


def test_priority_needs_the_priority_policy(client):
    assert_error(client.post(COMP, json={"prompt": "x", "priority": 1}), 400, "priority")


def test_ignored_and_refused_fields(client):
    ok = client.post(CHAT, json={"messages": MSG, "max_tokens": 1, "user": "u1", "metadata": {"k": "v"},
                                 "store": False, "service_tier": "auto", "modalities": ["text"]})
    assert ok.status_code == 200
    assert_error(client.post(CHAT, json={"messages": MSG, "kv_transfer_params": {"x": 1}}), 400,
                 "kv_transfer_params")
    assert_error(client.post(CHAT, json={"messages": MSG, "mm_processor_kwargs": {"x": 1}}), 400,
                 "mm_processor_kwargs")
    assert_error(client.post(CHAT, json={"messages": MSG, "service_tier": "flex"}), 400, "service_tier")
    assert_error(client.post(COMP, json={"prompt": "x", "use_beam_search": True, "stream": True}), 400,
                 "use_beam_search")


# --------------------------------------------------------------------------- chat extras


def test_chat_echo_prepends_the_last_assistant_message(client):
    msgs = MSG + [{"role": "assistant", "content": "Once,"}]
    body = client.post(CHAT, json={"messages": msgs, "max_tokens": 3, "temperature": 0, "echo": True,
                                   "add_generation_prompt": False, "continue_final_message": True}).json()
    plain = client.post(CHAT, json={"messages": msgs, "max_tokens": 3, "temperature": 0,
                                    "add_generation_prompt": False, "continue_final_message": True}).json()
    assert body["choices"][0]["message"]["content"] == "Once," + plain["choices"][0]["message"]["content"]
    no_echo = client.post(CHAT, json={"messages": MSG, "max_tokens": 3, "temperature": 0, "echo": True}).json()
    assert no_echo["choices"][0]["message"]["content"] == \
        client.post(CHAT, json={"messages": MSG, "max_tokens": 3, "temperature": 0}).json()["choices"][0]["message"]["content"]


def test_continue_final_message(client):
    tok = client.model.tokenizer
    msgs = MSG + [{"role": "assistant", "content": "The river"}]
    r = client.post(CHAT, json={"messages": msgs, "max_tokens": 1, "add_generation_prompt": False,
                                "continue_final_message": True})
    rendered = tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert rendered.endswith("The river")
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False))
    assert_error(client.post(CHAT, json={"messages": msgs, "continue_final_message": True}), 400,
                 "continue_final_message")


def test_request_chat_template_needs_trust(tiny_llama):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{{ greeting }}{{ documents|length }}"
    body = {"messages": MSG, "max_tokens": 1, "chat_template": template}
    with api_client(tiny_llama) as c:
        assert_error(c.post(CHAT, json=body), 400, "chat_template")
    with api_client(tiny_llama, trust_request_chat_template=True) as c:
        enc = lambda s: len(c.model.encode(s, add_special_tokens=False))  # noqa: E731
        base = f"<user>{MSG[0]['content']}"
        r = c.post(CHAT, json={**body, "chat_template_kwargs": {"greeting": "hi!"},
                               "documents": [{"title": "a", "text": "b"}, {"title": "c", "text": "d"}]})
        assert r.json()["usage"]["prompt_tokens"] == enc(base + "hi!2")
        assert_error(c.post(CHAT, json={**body, "chat_template": "{% for %}"}), 400, "chat_template")


def test_content_format_detection_and_response_role(tiny_llama):
    parts_template = ("{% for m in messages %}{{ m.role }}:{% for p in m.content %}[{{ p.text }}]{% endfor %}\n"
                      "{% endfor %}")
    with api_client(tiny_llama, chat_template=parts_template, response_role="narrator") as c:
        assert c.model.chat_template.content_format == "openai"
        body = c.post(CHAT, json={"messages": MSG, "max_tokens": 1}).json()
        # trim_blocks (as transformers renders) drops the newline after a block tag
        assert body["usage"]["prompt_tokens"] == len(c.model.encode(f"user:[{MSG[0]['content']}]",
                                                                      add_special_tokens=False))
        assert body["choices"][0]["message"]["role"] == "narrator"
    with api_client(tiny_llama, chat_template=parts_template, chat_template_content_format="string") as c:
        body = c.post(CHAT, json={"messages": MSG, "max_tokens": 1}).json()
        # a string iterated by the template yields characters, each bracketed
        assert body["usage"]["prompt_tokens"] > 40


# --------------------------------------------------------------------------- server defaults


def test_generation_config_defaults(tiny_llama, tmp_path):
    model = tmp_path / "gen-model"
    shutil.copytree(tiny_llama, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.0, "max_new_tokens": 5}))
    with api_client(model) as c:
        a = c.post(COMP, json={"prompt": PROMPT, "ignore_eos": True}).json()
        b = c.post(COMP, json={"prompt": PROMPT, "ignore_eos": True}).json()
        assert a["usage"]["completion_tokens"] == 5 and a["choices"][0]["text"] == b["choices"][0]["text"]
        own = c.post(COMP, json={"prompt": PROMPT, "ignore_eos": True, "max_tokens": 7}).json()
        assert own["usage"]["completion_tokens"] == 7
    with api_client(model, generation_config="vllm") as c:
        assert c.post(COMP, json={"prompt": PROMPT, "ignore_eos": True}).json()["usage"]["completion_tokens"] == 16


# --------------------------------------------------------------------------- tokenizer API


def test_tokenize_and_detokenize(client):
    tok = client.model.tokenizer
    r = client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(PROMPT) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256 and r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    chat = client.post("/tokenize", json={"messages": MSG}).json()
    rendered = tok.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False) and chat["token_strs"] is None
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": tok.decode(r["tokens"])}
    assert_error(client.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    assert_error(client.post("/tokenize", json={"prompt": 5}), 400, "prompt")
    assert_error(client.post("/tokenize", json={"prompt": "x", "model": "other"}), 404, "model")
