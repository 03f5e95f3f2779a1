"""GET /health, GET /version (both open without an API key) and GET /metrics (Prometheus text through\nprometheus-client, with vLLM's metric names)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from patchbay import __version__, hookimpl
from patchbay.serving import ServingDep

#: vLLM's gauge and counter names (without the ``vllm:`` prefix) -> (help, EngineStats field)
GAUGES = {
    "num_requests_running": ("Number of requests in model execution batches.", "running"),
    "num_requests_waiting": ("Number of requests waiting to be processed.", "waiting"),
    "kv_cache_usage_perc": ("KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
}
COUNTERS = {
    "prompt_tokens": ("Number of prefill tokens processed.", "prompt_tokens"),
    "generation_tokens": ("Number of generation tokens processed.", "generated_tokens"),
    "num_preemptions": ("Cumulative number of preemption from the engine.", "preemptions"),
    "prefix_cache_queries": ("Prefix cache queries, in terms of number of queried tokens.",
                             "prefix_cache_query_tokens"),
    "prefix_cache_hits": ("Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hit_tokens"),
}
#: vLLM's multi-modal cache counters -> (help, position in ``ServedModel.image_cache_stats()``)
MM_COUNTERS = {
    "mm_cache_queries": ("Multi-modal cache queries, in terms of number of queried items.", 0),
    "mm_cache_hits": ("Multi-modal cache hits, in terms of number of cached items.", 1),
}
HISTOGRAMS = {
    "time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "request_prompt_tokens": "Number of prefill tokens processed.",
    "request_generation_tokens": "Number of generation tokens processed.",
}


class EngineCollector:
    """A prometheus-client collector reading each model's engine snapshot at scrape time, under vLLM's
    metric names with the label ``model_name`` (so dashboards built for vLLM work unchanged). The engine
    counts once per step; nothing here runs per token."""

    def __init__(self, serving):
        self.serving = serving

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snapshots = [(m.names[0], m.stats()) for m in self.serving.models]
        for name, (help_text, field) in GAUGES.items():
            family = GaugeMetricFamily(f"vllm:{name}", help_text, labels=["model_name"])
            for model, stats in snapshots:
                family.add_metric([model], float(getattr(stats, field)))
            yield family
        for name, (help_text, field) in COUNTERS.items():
            family = CounterMetricFamily(f"vllm:{name}", help_text, labels=["model_name"])
            for model, stats in snapshots:
                family.add_metric([model], float(getattr(stats, field)))
            yield family
        images = [(m.names[0], m.image_cache_stats()) for m in self.serving.models]
        for name, (help_text, at) in MM_COUNTERS.items():
            family = CounterMetricFamily(f"vllm:{name}", help_text, labels=["model_name"])
            for model, counts in images:
                family.add_metric([model], float(counts[at]))
            yield family
        steps = CounterMetricFamily("patchbay:engine_steps", "Engine steps run (patchbay's own; not in vLLM).",
                                    labels=["model_name"])
        for model, stats in snapshots:
            steps.add_metric([model], float(stats.steps))
        yield steps
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=["model_name", "finished_reason"])
        for model, stats in snapshots:
            for reason in sorted({"stop", "length", "abort", *stats.finished}):
                success.add_metric([model, reason], float(stats.finished.get(reason, 0)))
        yield success
        for name, help_text in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"vllm:{name}", help_text, labels=["model_name"])
            for model, stats in snapshots:
                bounds, cumulative, total = stats.histograms[name]
                buckets = [(repr(float(b)), float(c)) for b, c in zip(bounds, cumulative)]
                buckets.append(("+Inf", float(cumulative[-1])))
                family.add_metric([model], buckets, total)
            yield family


def _registry(request: Request, serving) -> Any:
    state = request.app.state
    if getattr(state, "metrics_registry", None) is None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(EngineCollector(serving))
        state.metrics_registry = registry
    return state.metrics_registry


@get("/health", opt={"auth": False})
async def health(serving: ServingDep) -> Response:
    dead = next((m.dead for m in serving.models if m.dead is not None), None)
    if dead is not None:
        return Response(content={"error": {"message": dead, "type": "server_error", "param": None, "code": None}},
                        status_code=503)
    return Response(content=b"", status_code=200)


@get("/version", opt={"auth": False})
async def version() -> dict[str, str]:
    return {"version": __version__}


@get("/metrics")
async def metrics(request: Request, serving: ServingDep) -> Response:
    """Prometheus exposition of every model's engine, with vLLM's metric names."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    media = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")  # Litestar adds the charset
    return Response(content=generate_latest(_registry(request, serving)), media_type=media)


@hookimpl
def register_routes(register):
    register(health)
    register(version)
    register(metrics)
