"""Schemathesis over /openapi.json: every operation, positive and negative cases, on a generative model and on
an encoder (so the pooling routes run, not only refuse), and the audio forms on Whisper. ``make test`` runs a
short fixed-seed pass; ``make fuzz`` sets ``PATCHBAY_FUZZ_EXAMPLES`` for the long one (>= 2,000 requests)."""

from __future__ import annotations

import os
import time

import pytest

from apikit import api_client, multi_client
from fuzzkit import fuzz

EXAMPLES = int(os.environ.get("PATCHBAY_FUZZ_EXAMPLES", "5"))
SEED = int(os.environ.get("PATCHBAY_FUZZ_SEED", "18"))
KEY = "sk-fuzz"


def _run(client, label: str, min_posts: int = 10, **kwargs) -> None:
    report = fuzz(client, examples=EXAMPLES, seed=SEED, api_key=KEY, **kwargs)
    print(f"\n{label}: {report.requests} requests, statuses {dict(sorted(report.by_status.items()))}, "
          f"slowest {report.slowest:.2f} s")
    posts = [op for op in report.by_operation if op.startswith("POST")]
    assert len(posts) >= min_posts, report.by_operation
    assert not report.failures, "\n".join(report.failures[:20])
    stats = client.model.stats()
    assert stats.running == 0 and stats.waiting == 0 and client.get("/health").status_code == 200


def test_fuzz_generative_model(tiny_llama):
    with api_client(tiny_llama, max_model_len=64, api_key=(KEY,), max_num_seqs=16) as client:
        _run(client, "generative")


def test_fuzz_encoder(tiny_encoder_factory):
    with api_client(tiny_encoder_factory("BertModel", sentence_transformers=True), api_key=(KEY,),
                    max_model_len=None) as client:
        _run(client, "encoder")


def test_fuzz_tools_and_responses(tiny_tool_model):
    """Chat and /v1/responses on a server with a tool parser and a reasoning parser, bodies without ``model``
    (so they reach the model rather than a 404): random tools, tool_choice and input items reach the tool
    checks, the grammars and the parsers; none may answer a 500."""
    with api_client(tiny_tool_model, max_model_len=256, api_key=(KEY,), max_num_seqs=16, tool_call_parser="hermes",
                    enable_auto_tool_choice=True, reasoning_parser="deepseek_r1") as client:
        report = fuzz(client, examples=EXAMPLES, seed=SEED, api_key=KEY, paths=("/v1/chat/", "/v1/responses"),
                      drop=("model",))
        print(f"\ntools: {report.requests} requests, statuses {dict(sorted(report.by_status.items()))}")
        assert {op.split()[1] for op in report.by_operation} >= {"/v1/chat/completions", "/v1/responses"}
        assert not report.failures, "\n".join(report.failures[:20])
        for _ in range(100):  # background responses the fuzz started end by themselves
            stats = client.model.stats()
            if stats.running == stats.waiting == 0:
                break
            time.sleep(0.1)
        assert stats.running == 0 and stats.waiting == 0 and client.get("/health").status_code == 200


def test_fuzz_speech_forms(tiny_whisper):
    """The audio routes on a Whisper model, their multipart forms generated from the document; every other
    request carries a real WAV in ``file``, so the other fields reach decoding and the engine."""
    from speechkit import clip, wav

    with api_client(tiny_whisper, api_key=(KEY,), max_model_len=None) as client:
        _run(client, "speech", min_posts=2, paths=("/v1/audio/",), files={"file": wav(clip(1, 0.5))})


def test_fuzz_several_models(tiny_llama, tiny_encoder_factory):
    """One server of a generative model and an encoder: every other JSON body names one of them, so the
    routes resolve both (a body naming none is the 400 that asks for a name, a generated name a 404)."""
    encoder = tiny_encoder_factory("BertModel", sentence_transformers=True)
    with multi_client({"model": tiny_llama, "served_model_name": ("gen",), "max_model_len": 64, "max_num_seqs": 16},
                      {"model": encoder, "served_model_name": ("enc",), "max_model_len": None},
                      api_key=(KEY,)) as client:
        report = fuzz(client, examples=EXAMPLES, seed=SEED, api_key=KEY, models=("gen", "enc"))
        print(f"\nseveral models: {report.requests} requests, statuses {dict(sorted(report.by_status.items()))}, "
              f"slowest {report.slowest:.2f} s")
        assert not report.failures, "\n".join(report.failures[:20])
        assert report.by_status[200] >= 20, report.by_status
        for model in client.serving.models:
            stats = model.stats()
            assert stats.running == 0 and stats.waiting == 0
        assert client.get("/health").status_code == 200


# Image models: downloads only from 127.0.0.1 (loopback), so whatever URL the fuzzer makes up, nothing is
# resolved or fetched anywhere else (the domain rule refuses it before any lookup).
def test_fuzz_vision_language_model(tiny_llava):
    with api_client(tiny_llava, max_model_len=128, api_key=(KEY,), max_num_seqs=16,
                    allowed_media_domains=("127.0.0.1",)) as client:
        _run(client, "llava")


def test_fuzz_dual_encoder(tiny_clip):
    with api_client(tiny_clip, api_key=(KEY,), max_model_len=None, allowed_media_domains=("127.0.0.1",)) as client:
        _run(client, "clip")
