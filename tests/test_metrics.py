"""/metrics through prometheus-client with vLLM's names and the label model_name, counted per engine step."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from apikit import api_client
from serverkit import parse_metrics

COMP = "/v1/completions"
VLLM_NAMES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter", "vllm:num_preemptions": "counter",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram", "vllm:mm_cache_queries": "counter", "vllm:mm_cache_hits": "counter",
}


@pytest.fixture(scope="module")
def client(tiny_llama):
    with api_client(tiny_llama, served_model_name=("tiny", "alias")) as c:
        yield c


def test_vllm_names_types_and_label(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].count("charset") <= 1 and r.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name, kind in VLLM_NAMES.items():
        assert families[name].type == kind, name
        assert all(s.labels["model_name"] == "tiny" for s in families[name].samples), name


def test_counts_follow_requests(client):
    before = parse_metrics(client.get("/metrics").text)
    prompt = "Count these tokens for the metrics please"
    n_prompt = len(client.model.encode(prompt))
    for _ in range(2):  # the second one hits the prefix cache
        r = client.post(COMP, json={"prompt": prompt, "max_tokens": 5, "ignore_eos": True, "n": 2})
        assert r.status_code == 200
    client.post(COMP, json={"prompt": prompt, "max_tokens": 0, "echo": True})
    after = parse_metrics(client.get("/metrics").text)
    diff = {k: after[k] - before.get(k, 0.0) for k in after}
    assert diff["generation_tokens_total"] == 2 * 2 * 5 + 1  # the scoring request samples one token it drops
    assert diff["prompt_tokens_total"] == 5 * n_prompt
    assert diff["request_success_total{finished_reason=length}"] == 5
    assert diff["time_to_first_token_seconds_count"] == 5
    assert diff["inter_token_latency_seconds_count"] == 4 * 4
    assert diff["e2e_request_latency_seconds_count"] == 5
    assert diff["request_generation_tokens_sum"] == 20
    assert diff["request_prompt_tokens_sum"] == 5 * n_prompt
    assert diff["prefix_cache_hits_total"] > 0 and diff["prefix_cache_queries_total"] >= diff["prefix_cache_hits_total"]
    assert after["num_requests_running"] == 0 and after["num_requests_waiting"] == 0
    assert after["kv_cache_usage_perc"] == 0
