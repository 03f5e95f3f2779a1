"""The transformers fallback family: every fallback architecture answers exactly as transformers' ``generate``
(completions and chat, streamed or not, alone and batched, prompts shorter and longer than a KV block and
than the sliding window, with prefix caching and chunked prefill), through the official openai client; and
the comparison is sharp enough to see a wrong cap, window or scale (each broken on purpose once)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from openai import OpenAI

from apikit import api_client
from fallbackkit import FALLBACK_ARCHS, PROMPTS, ask, ask_many, mismatches, reference_answers, run_matrix
from patchbay.model import CausalPoolingModel, GenerativeModel, LoadRequest, check_model
from patchbay_plugins.models import fallback
from patchbay_plugins.models.fallback import attention as fb_attention
from patchbay_plugins.models.fallback.causal import TransformersCausalModel

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=FALLBACK_ARCHS)
def arch_dir(request, tiny_model_factory):
    return request.param, tiny_model_factory(request.param)


@pytest.fixture(scope="module")
def references(tiny_model_factory):
    """transformers' generate answers per architecture, computed once."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = reference_answers(tiny_model_factory(arch))
        return cache[arch]

    return get


def openai_client(test_client) -> OpenAI:
    """The official client, sending through the in-process test client (an httpx.Client)."""
    return OpenAI(base_url=str(test_client.base_url) + "/v1", api_key="unused", http_client=test_client,
                  max_retries=0)


def load(model_dir, task="generate"):
    from transformers import AutoConfig

    return fallback.load(LoadRequest(model_dir=model_dir, hf_config=AutoConfig.from_pretrained(model_dir), task=task,
                                     dtype=torch.float32, device=torch.device("cpu")))


# --------------------------------------------------------------------------- every architecture, as generate does


def test_every_architecture_matches_generate(arch_dir, references):
    """The whole matrix through the openai client, against generate; chunked prefill (a 24-token step budget
    splits the long prompts), prefix caching (two long prompts share several blocks) and batching included."""
    arch, model_dir = arch_dir
    want = references(arch)
    with api_client(model_dir, max_num_batched_tokens=24, max_model_len=128) as c:
        model = c.model.engine.runner.model
        assert isinstance(model, TransformersCausalModel) and model.architecture == arch
        got = run_matrix(openai_client(c), "tiny", stats=c.model.stats)
        stats = c.model.stats()
    bad = mismatches(got, want)
    assert not bad, "\n".join(bad)
    assert stats.prefix_cache_hits > 0, "the shared-prefix prompts never hit the prefix cache"
    assert {a.finish_reason for a in got.values()} <= {"stop", "length"}


def test_loaded_model_fulfils_the_contract(arch_dir):
    arch, model_dir = arch_dir
    model = load(model_dir)
    assert check_model("transformers", "generate", model) is GenerativeModel
    cfg = model.config
    assert model.kv_layout.num_layers == cfg.num_hidden_layers
    assert model.sliding_window is None  # windows are per layer, from transformers' keyword arguments
    assert model.vocab_size == cfg.vocab_size and model.num_parameters > 0
    windows = {seen.sliding_window for seen in model.layers}
    if getattr(cfg, "sliding_window", None) and arch != "Qwen3MoeForCausalLM":
        assert 12 in windows, f"{arch}: no layer was handed its sliding window"


def test_options_the_tests_rely_on_reach_the_attention_function(tiny_model_factory):
    """What transformers hands the attention function, as the fallback records it at load."""
    gemma2 = load(tiny_model_factory("Gemma2ForCausalLM"))
    assert [(s.sliding_window, s.softcap) for s in gemma2.layers] == [(12, 4.0), (None, 4.0)]
    assert gemma2.logit_options == [("final_logit_softcapping", 3.0)]
    gemma3 = load(tiny_model_factory("Gemma3ForCausalLM"))
    assert [s.sliding_window for s in gemma3.layers] == [12, None]
    assert load(tiny_model_factory("GraniteForCausalLM")).logit_options == [("logits_scaling", 0.5)]


# --------------------------------------------------------------------------- each comparison can fail


def _break_softcap(real):
    return lambda q, k, v, kc, vc, meta, scale, softcap=None: real(q, k, v, kc, vc, meta, scale)


def _break_window(real):
    return lambda q, k, v, kc, vc, meta, scale, softcap=None: real(
        q, k, v, kc, vc, dataclasses.replace(meta, sliding_window=None), scale, softcap=softcap)


def _break_scale(real):
    return lambda q, k, v, kc, vc, meta, scale, softcap=None: real(
        q, k, v, kc, vc, meta, q.shape[-1] ** -0.5, softcap=softcap)


BREAKS = {
    "softcap-ignored": (_break_softcap, ("Gemma2ForCausalLM",)),
    "window-ignored": (_break_window, ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                                       "MixtralForCausalLM")),
    "scaling-ignored": (_break_scale, ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM")),
}


@pytest.mark.parametrize("arch,brk", [(a, b) for b, (_, archs) in BREAKS.items() for a in archs])
def test_broken_attention_changes_the_text(arch, brk, tiny_model_factory, references, monkeypatch):
    """Each attention option the matrix relies on, ignored on purpose (after the start-up self-check): the
    same comparison against generate then fails, so the models are sharp enough to show the bug."""
    breaker = BREAKS[brk][0]
    want = references(arch)
    with api_client(tiny_model_factory(arch), max_model_len=128) as c:
        monkeypatch.setattr(fb_attention, "paged_attention", breaker(fb_attention.paged_attention))
        client = openai_client(c)
        got = {("completion", p, False, "batch"): a for p, a in zip(PROMPTS, ask_many(client, "tiny", "completion",
                                                                                       PROMPTS, False))}
    assert mismatches(got, want), f"{arch} with {brk}: still equal to generate (the test could not fail)"


@pytest.mark.parametrize("arch,option", [("Gemma2ForCausalLM", "final_logit_softcapping"),
                                         ("GraniteForCausalLM", "logits_scaling")])
def test_broken_logit_option_changes_the_logprobs(arch, option, tiny_model_factory, references):
    """A final soft-cap or a logits divisor is monotonic: greedy text cannot show it, log-probabilities do."""
    want = references(arch)
    with api_client(tiny_model_factory(arch), max_model_len=128) as c:
        model = c.model.engine.runner.model
        model.logit_options = [(n, v) for n, v in model.logit_options if n != option]
        got = {("completion", p, False, "alone"): ask(openai_client(c), "tiny", "completion", p, False,
                                                      logprobs=True) for p in PROMPTS[:2]}
    assert all(a == want[(k, p)] for (k, p, _, _), a in got.items()), "a logit option changed greedy text"
    assert mismatches(got, want), f"{arch} without {option}: log-probabilities still equal to generate's"


@pytest.mark.parametrize("brk", sorted(BREAKS))
def test_the_startup_self_check_refuses_broken_attention(brk, tiny_model_factory, monkeypatch):
    monkeypatch.setattr(fb_attention, "paged_attention", BREAKS[brk][0](fb_attention.paged_attention))
    with pytest.raises(fb_attention.UnsupportedAttention, match="self-check failed.*in its attention"):
        load(tiny_model_factory("Gemma2ForCausalLM"))


def test_the_startup_self_check_refuses_unknown_logit_transforms(tiny_model_factory, monkeypatch):
    from patchbay_plugins.models.fallback import causal

    monkeypatch.setattr(causal, "LOGIT_OPTIONS", {k: v for k, v in causal.LOGIT_OPTIONS.items()
                                                  if k != "logits_scaling"})
    with pytest.raises(fb_attention.UnsupportedAttention, match="self-check failed.*in its logits"):
        load(tiny_model_factory("GraniteForCausalLM"))


# --------------------------------------------------------------------------- --model-impl and decoders as embedders


def test_model_impl_transformers_on_llama_gives_the_native_text(tiny_llama):
    bodies = [("/v1/completions", {"prompt": p, "max_tokens": 16, "temperature": 0}) for p in PROMPTS[:6]]
    bodies.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}],
                                             "max_tokens": 16, "temperature": 0}))

    def texts(c):
        out = []
        for path, body in bodies:
            choice = c.post(path, json=body).json()["choices"][0]
            out.append((choice.get("text") or choice["message"]["content"], choice["finish_reason"]))
        return out

    with api_client(tiny_llama) as native:
        assert type(native.model.engine.runner.model).__name__ == "LlamaFamilyModel"
        want = texts(native)
    with api_client(tiny_llama, model_impl="transformers") as c:
        assert isinstance(c.model.engine.runner.model, TransformersCausalModel)
        assert texts(c) == want
    with api_client(tiny_llama, model_impl="vllm") as c:
        assert type(c.model.engine.runner.model).__name__ == "LlamaFamilyModel"


def test_decoder_as_embedder_matches_last_token_states(tiny_model_factory):
    """``--convert embed`` on a fallback architecture: the last token's final state, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    model_dir = tiny_model_factory("Phi3ForCausalLM")
    with api_client(model_dir, convert="embed") as c:
        assert check_model("transformers", "embed", c.model.engine.runner.model) is CausalPoolingModel
        got = c.post("/v1/embeddings", json={"input": list(PROMPTS[:3]), "encoding_format": "float"}).json()
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    for text, row in zip(PROMPTS[:3], got["data"]):
        with torch.inference_mode():
            state = base(**tok(text, return_tensors="pt")).last_hidden_state[0, -1]
        torch.testing.assert_close(torch.tensor(row["embedding"]), torch.nn.functional.normalize(state, dim=0),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "MixtralForCausalLM"])
def test_bfloat16_passes_the_self_check_and_serves(arch, tiny_model_factory):
    with api_client(tiny_model_factory(arch), dtype="bfloat16", max_model_len=128) as c:
        model = c.model.engine.runner.model
        assert model.dtype == torch.bfloat16 and model.kv_layout.num_layers == 2
        answers = ask_many(openai_client(c), "tiny", "completion", PROMPTS, False)
    assert all(a.completion_tokens > 0 and a.finish_reason in ("stop", "length") for a in answers)


# --------------------------------------------------------------------------- a multimodal causal LM, text alone


@pytest.fixture(scope="module")
def gemma3_multimodal(tmp_path_factory):
    """A tiny ``Gemma3ForConditionalGeneration`` (the class of Gemma 3 4B and up: a SigLIP tower beside the
    text model; transformers lists it among its causal LMs), its text model as the tiny Gemma 3's: sharp
    attention, a window shorter than the long prompts."""
    from transformers import GenerationConfig

    from patchbay_plugins.tinymodels.tokenizers import (BOS, DEFAULT_CHAT_TEMPLATE, EOS, IM_END, PAD, SPECIAL_TOKENS,
                                                        save_chat_tokenizer)
    from patchbay_plugins.tinymodels.weights import write_config_and_weights
    from patchbay_plugins.tinymodels.zoo import FALLBACK_QK_GAIN, fallback_config

    out = tmp_path_factory.mktemp("gemma3-mm")
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    eos = [ids[EOS], ids[IM_END]]
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.125,
                bos_token_id=ids[BOS], eos_token_id=eos, pad_token_id=ids[PAD], **fallback_config("Gemma3ForCausalLM")[1])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    write_config_and_weights(out, "Gemma3ForConditionalGeneration", "Gemma3Config",
                             dict(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=509,
                                  boi_token_index=510, eoi_token_index=511, initializer_range=0.125),
                             dtype=torch.float32, seed=0, shards=1, qk_gain=FALLBACK_QK_GAIN)
    GenerationConfig(bos_token_id=ids[BOS], eos_token_id=eos, pad_token_id=ids[PAD]).save_pretrained(out)
    save_chat_tokenizer(out, 512, 256, DEFAULT_CHAT_TEMPLATE)
    return out


def test_a_multimodal_causal_lm_serves_text_alone_as_generate(gemma3_multimodal):
    """Gemma 3's multimodal class through the fallback: text answers as generate's; an image is a 400."""
    want = reference_answers(gemma3_multimodal)
    with api_client(gemma3_multimodal, max_model_len=128) as c:
        assert c.model.engine.runner.model.architecture == "Gemma3ForConditionalGeneration"
        client = openai_client(c)
        got = {(kind, p, False, "batch"): a for kind in ("completion", "chat")
               for p, a in zip(PROMPTS, ask_many(client, "tiny", kind, PROMPTS, False))}
        image = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "messages": [{
            "role": "user", "content": [{"type": "text", "text": "hi"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    bad = mismatches(got, want)
    assert not bad, "\n".join(bad)
    assert len({a.text for a in got.values()}) > 4  # not one degenerate answer for every prompt
    assert image.status_code == 400 and image.json()["error"]["param"] == "messages[0].content[1].type"
