"""GET /health, GET /version (both open without an API key) and GET /metrics (Prometheus text)."""

from __future__ import annotations

from litestar import Response, get

from patchbay import __version__, hookimpl
from patchbay.serving import ServingDep

#: /metrics rows: (name, type, help, EngineStats field)
METRICS = (
    ("num_requests_running", "gauge", "Sequences in the running batch", "running"),
    ("num_requests_waiting", "gauge", "Sequences waiting to be scheduled", "waiting"),
    ("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use", "kv_cache_usage"),
    ("kv_cache_free_blocks", "gauge", "Free KV cache blocks (empty or evictable)", "free_blocks"),
    ("kv_cache_total_blocks", "gauge", "KV cache blocks in all", "total_blocks"),
    ("num_preemptions_total", "counter", "Sequences preempted for recompute", "preemptions"),
    ("generation_tokens_total", "counter", "Tokens generated", "generated_tokens"),
    ("engine_steps_total", "counter", "Engine steps run", "steps"),
    ("prefix_cache_queries_total", "counter", "Prompts looked up in the prefix cache", "prefix_cache_queries"),
    ("prefix_cache_hits_total", "counter", "Prompts that reused cached blocks", "prefix_cache_hits"),
)


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


@get("/metrics", media_type="text/plain; version=0.0.4")
async def metrics(serving: ServingDep) -> str:
    """Each model's engine gauges and counters, labelled with its first name."""
    snapshots = [(m.names[0], m.stats()) for m in serving.models]
    lines = []
    for name, kind, help_text, field in METRICS:
        lines.append(f"# HELP patchbay:{name} {help_text}")
        lines.append(f"# TYPE patchbay:{name} {kind}")
        for model, stats in snapshots:
            value = getattr(stats, field)
            value = round(value, 6) if isinstance(value, float) else value
            lines.append(f'patchbay:{name}{{model_name="{model}"}} {value}')
    return "\n".join(lines) + "\n"


@hookimpl
def register_routes(register):
    register(health)
    register(version)
    register(metrics)
