"""GET /health, GET /version (both open without an API key) and GET /metrics (Prometheus text)."""

from __future__ import annotations

from litestar import Response, get

from patchbay import __version__, hookimpl
from patchbay.serving import ServingDep


@get("/health")
async def health(serving: ServingDep) -> Response:
    if serving.engine.dead is not None:
        return Response(content={"error": {"message": serving.engine.dead, "type": "server_error", "param": None,
                                           "code": None}}, status_code=503)
    return Response(content=b"", status_code=200)


@get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@get("/metrics", media_type="text/plain; version=0.0.4")
async def metrics(serving: ServingDep) -> str:
    """Engine gauges and counters. Read without locking: each value is a snapshot of one int."""
    engine = serving.engine
    sched = engine.scheduler
    blocks = sched.blocks
    model = serving.model_names[0]
    rows = [
        ("num_requests_running", "gauge", "Sequences in the running batch", len(sched.running)),
        ("num_requests_waiting", "gauge", "Sequences waiting to be scheduled", len(sched.waiting)),
        ("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use", round(blocks.usage(), 6)),
        ("kv_cache_free_blocks", "gauge", "Free KV cache blocks (empty or evictable)", blocks.num_free),
        ("kv_cache_total_blocks", "gauge", "KV cache blocks in all", blocks.num_blocks),
        ("num_preemptions_total", "counter", "Sequences preempted for recompute", sched.num_preemptions),
        ("generation_tokens_total", "counter", "Tokens generated", engine.generated_tokens),
        ("engine_steps_total", "counter", "Engine steps run", engine.steps),
        ("prefix_cache_queries_total", "counter", "Prompts looked up in the prefix cache", blocks.queries),
        ("prefix_cache_hits_total", "counter", "Prompts that reused cached blocks", blocks.hits),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines.append(f"# HELP patchbay:{name} {help_text}")
        lines.append(f"# TYPE patchbay:{name} {kind}")
        lines.append(f'patchbay:{name}{{model_name="{model}"}} {value}')
    return "\n".join(lines) + "\n"


@hookimpl
def register_routes(register):
    register(health)
    register(version)
    register(metrics)
