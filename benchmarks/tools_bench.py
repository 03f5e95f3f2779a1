"""Tool calling and the Responses API: what they cost against plain chat on the same model, same run.

Through ``serve --tool-call-parser hermes --enable-auto-tool-choice`` on the ~34M benchmark model given a
Hermes chat template and the tool markup as added tokens, ``--concurrency`` requests at a time, each with
``--max-tokens`` output tokens (``ignore_eos``), every prompt fresh (random words: no prefix-cache hits
across modes or repeats). Modes, alternated within each repeat; medians of output tokens/s:

- ``chat``: plain chat, no tools (the baseline);
- ``chat+tools none``: the same with two tools in the prompt, ``tool_choice: "none"`` (the longer prompt's cost);
- ``chat+tools required``: ``tool_choice: "required"``, calls held by the hermes grammar (llguidance);
- ``chat+tools strict auto``: strict tools under ``"auto"``: the lazy grammar watches every step;
- ``responses``: ``POST /v1/responses`` with the plain chat's input (the Responses layer's cost).

Constrained calls end when the call does, so those modes make fewer output tokens than ``max_tokens``: compare
them by requests/s as well (the table has both). Writes JSON (``--out``) and prints a markdown table.

    .venv/bin/python benchmarks/tools_bench.py --repeats 3 --out bench-results/tools.json
    .venv/bin/python benchmarks/tools_bench.py --repeats 1 --requests 4 --concurrency 2 --max-tokens 16   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

from patchbay_bench.serveproc import start_serve, stop_serve

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                        "unit": {"enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "set_alarm", "description": "Set an alarm.",
        "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                                        "label": {"type": "string", "maxLength": 32}},
                       "required": ["hour", "label"], "additionalProperties": False}}},
]
STRICT = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
MODES = {
    "chat": ("chat", {}),
    "chat+tools none": ("chat", {"tools": TOOLS, "tool_choice": "none"}),
    "chat+tools required": ("chat", {"tools": TOOLS, "tool_choice": "required"}),
    "chat+tools strict auto": ("chat", {"tools": STRICT, "tool_choice": "auto"}),
    "responses": ("responses", {}),
}
WORDS = "river stone cloud lamp orbit maple signal harbor velvet quartz meadow ember canyon lantern".split()


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(24)) + "?"


async def one(client, kind: str, extra: dict, text: str, max_tokens: int) -> int:
    if kind == "chat":
        body = {"model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0.8, **extra}
        if "tools" not in extra or extra.get("tool_choice") == "none":
            body["ignore_eos"] = True
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]
    r = await client.post("/v1/responses", json={"model": "bench", "input": text, "max_output_tokens": max_tokens,
                                                 "temperature": 0.8, "ignore_eos": True, "store": False})
    r.raise_for_status()
    return r.json()["usage"]["output_tokens"]


async def level(url: str, kind: str, extra: dict, n: int, concurrency: int, max_tokens: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    texts = [prompt(rng) for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def run(text: str) -> int:
            async with sem:
                return await one(client, kind, extra, text, max_tokens)

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(run(t) for t in texts)))
        took = time.perf_counter() - start
    return {"output_tokens": tokens, "seconds": took, "output_throughput": tokens / took, "requests_per_s": n / took}


def main() -> None:
    from patchbay_plugins.tinymodels import HERMES_CHAT_TEMPLATE, TOOL_TOKENS, benchmark_model_config, cached_model

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=8756)
    p.add_argument("--out", default="bench-results/tools.json")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = cached_model("bench-llama-tools", {**benchmark_model_config("float32"),
                                                   "chat_template": HERMES_CHAT_TEMPLATE, "added_tokens": TOOL_TOKENS})
    proc = start_serve(model_dir, args.port, ["--cpu-threads", "2", "--served-model-name", "bench", "--max-model-len",
                                              "2048", "--log-level", "warning", "--tool-call-parser", "hermes",
                                              "--enable-auto-tool-choice"], out.with_suffix(".serve.log"), threads=2)
    url = f"http://127.0.0.1:{args.port}"
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    tokens: dict[str, list[int]] = {m: [] for m in MODES}
    try:
        for r in range(args.repeats):
            for i, (mode, (kind, extra)) in enumerate(MODES.items()):
                res = asyncio.run(level(url, kind, extra, args.requests, args.concurrency, args.max_tokens,
                                        seed=1000 * r + i))
                runs[mode].append(res["output_throughput"])
                rates[mode].append(res["requests_per_s"])
                tokens[mode].append(res["output_tokens"])
                print(f"run {r} {mode}: {res['output_throughput']:.1f} tok/s ({res['output_tokens']} tokens)",
                      file=sys.stderr)
    finally:
        stop_serve(proc)
    base = statistics.median(runs["chat"])
    base_rate = statistics.median(rates["chat"])
    result = {"settings": vars(args), "modes": {
        m: {"median_tok_s": statistics.median(v), "vs_chat": statistics.median(v) / base,
            "median_requests_s": statistics.median(rates[m]), "requests_vs_chat": statistics.median(rates[m]) / base_rate,
            "output_tokens_per_request": sum(tokens[m]) / (args.requests * args.repeats), "runs": v}
        for m, v in runs.items()}}
    out.write_text(json.dumps(result, indent=2))
    print(table(result, args))


def table(result: dict, args: argparse.Namespace) -> str:
    """The markdown table docs/benchmarks.md takes."""
    lines = [f"{args.requests} requests at concurrency {args.concurrency}, up to {args.max_tokens} output tokens, "
             f"{args.repeats} repeat(s)", "",
             "| mode | output tok/s (median) | vs chat | requests/s (median) | vs chat | output tokens / request |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mode, r in result["modes"].items():
        lines.append(f"| {mode} | {r['median_tok_s']:.1f} | {r['vs_chat']:.0%} | {r['median_requests_s']:.2f} | "
                     f"{r['requests_vs_chat']:.0%} | {r['output_tokens_per_request']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
