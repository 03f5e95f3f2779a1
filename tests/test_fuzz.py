"""Schemathesis over /openapi.json: every operation, positive and negative cases, on a generative model, on
an encoder (so the pooling routes run, not only refuse) and on a Whisper (the audio routes' forms). ``make test`` runs a short fixed-seed pass;
``make fuzz`` sets ``PATCHBAY_FUZZ_EXAMPLES`` for the long one (>= 2,000 requests)."""

from __future__ import annotations

import os

import pytest

from apikit import api_client
from fuzzkit import fuzz

EXAMPLES = int(os.environ.get("PATCHBAY_FUZZ_EXAMPLES", "5"))
SEED = int(os.environ.get("PATCHBAY_FUZZ_SEED", "18"))
KEY = "sk-fuzz"


def _run(client, label: str) -> None:
    report = fuzz(client, examples=EXAMPLES, seed=SEED, api_key=KEY)
    print(f"\n{label}: {report.requests} requests, statuses {dict(sorted(report.by_status.items()))}, "
          f"slowest {report.slowest:.2f} s")
    posts = [op for op in report.by_operation if op.startswith("POST")]
    assert len(posts) >= 10, report.by_operation
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


def test_fuzz_speech_model(tiny_whisper):
    """The audio routes run (not only refuse): their multipart forms, generated from /openapi.json."""
    with api_client(tiny_whisper, api_key=(KEY,), max_model_len=None) as client:
        report = fuzz(client, examples=EXAMPLES, seed=SEED, api_key=KEY)
        print(f"\nspeech: {report.requests} requests, statuses {dict(sorted(report.by_status.items()))}")
        assert not report.failures, "\n".join(report.failures[:20])
        speech = {op: n for op, n in report.by_operation.items() if op.startswith("POST /v1/audio/")}
        assert set(speech) == {"POST /v1/audio/transcriptions", "POST /v1/audio/translations"}, report.by_operation
        stats = client.model.stats()
        assert stats.running == 0 and stats.waiting == 0 and client.get("/health").status_code == 200
