"""Schemathesis over /openapi.json: every operation, positive and negative cases, on a generative model and on
an encoder (so the pooling routes run, not only refuse). ``make test`` runs a short fixed-seed pass;
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


# Image models: downloads only from 127.0.0.1 (loopback), so whatever URL the fuzzer makes up, nothing is
# resolved or fetched anywhere else (the domain rule refuses it before any lookup).
def test_fuzz_vision_language_model(tiny_llava):
    with api_client(tiny_llava, max_model_len=128, api_key=(KEY,), max_num_seqs=16,
                    allowed_media_domains=("127.0.0.1",)) as client:
        _run(client, "llava")


def test_fuzz_dual_encoder(tiny_clip):
    with api_client(tiny_clip, api_key=(KEY,), max_model_len=None, allowed_media_domains=("127.0.0.1",)) as client:
        _run(client, "clip")
