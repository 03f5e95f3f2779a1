"""Schemathesis over /openapi.json: every operation, positive and negative cases, on a generative model and on
an encoder (so the pooling routes run, not only refuse). ``make test`` runs a short fixed-seed pass;
``make fuzz`` sets ``PATCHBAY_FUZZ_EXAMPLES`` for the long one (>= 2,000 requests)."""

from __future__ import annotations

import os
import time

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

