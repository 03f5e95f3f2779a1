"""The transformers fallback through a real ``serve`` process and the official openai client: a sliding-window,
soft-capped model and a mixture of experts answer exactly as transformers' ``generate`` on the same folder."""

from __future__ import annotations

import types

import pytest
from openai import OpenAI

from fallbackkit import mismatches, reference_answers, run_matrix
from serverkit import serve

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Qwen3MoeForCausalLM"])
def test_serve_matches_generate(arch, tiny_model_factory, tmp_path):
    model_dir = tiny_model_factory(arch)
    want = reference_answers(model_dir)
    args = [str(model_dir), "--served-model-name", "tiny", "--max-num-batched-tokens", "24", "--max-model-len", "128",
            "--cpu-threads", "1"]
    with serve(args, tmp_path) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        def stats():
            m = server.metrics()
            return types.SimpleNamespace(steps=m["patchbay:engine_steps_total"], generated_tokens=m["generation_tokens_total"])

        got = run_matrix(client, "tiny", stats=stats)
        assert server.metrics()["prefix_cache_hits_total"] > 0
        log = server.output()
    bad = mismatches(got, want)
    assert not bad, "\n".join(bad)
    assert f"{arch}, family transformers [transformers implementation, --model-impl auto]" in log
