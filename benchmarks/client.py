"""``patchbay-bench``: load-test an OpenAI-compatible server, like ``vllm bench serve``.

Random prompts of ``--input-len`` token ids (fresh ones for every concurrency
level, so no level is flattered by a prefix cache), a fixed output length with
``ignore_eos``, streamed over ``/v1/completions``. For each concurrency level
it reports TTFT, TPOT, ITL (mean, median, p99, in ms), request and output
token throughput, and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from typing import Any

import httpx


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "mean": statistics.fmean(ms) if ms else float("nan"),
        "median": _percentile(ms, 0.5),
        "p99": _percentile(ms, 0.99),
    }


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # skip the lowest ids, where tokenizers keep their special tokens
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    start = time.perf_counter()
    ttft = None
    last = start
    itl: list[float] = []
    tokens = 0
    usage_tokens = None
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"{r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            if not event.get("choices"):
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - start
            else:
                itl.append(now - last)
            last = now
            tokens += 1
    latency = time.perf_counter() - start
    out_tokens = usage_tokens if usage_tokens is not None else tokens
    tpot = (latency - ttft) / (out_tokens - 1) if ttft is not None and out_tokens > 1 else None
    return {"ok": True, "ttft": ttft, "tpot": tpot, "itl": itl, "latency": latency, "output_tokens": out_tokens}


async def run_level(base_url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                    api_key: str | None, extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def task(prompt: list[int]) -> dict[str, Any]:
            async with sem:
                body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
                        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                        **(extra_body or {})}
                return await _one(client, url, body, headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(task(p) for p in prompts))
        duration = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    output_tokens = sum(r["output_tokens"] for r in ok)
    return {
        "concurrency": concurrency,
        "num_requests": len(prompts),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": [r["error"] for r in results if not r["ok"]][:3],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_output_tokens": output_tokens,
        "ttft_ms": _summary([r["ttft"] for r in ok if r["ttft"] is not None]),
        "tpot_ms": _summary([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_ms": _summary([x for r in ok for x in r["itl"]]),
    }


def format_table(levels: list[dict[str, Any]]) -> str:
    head = "| concurrency | output tok/s | req/s | TTFT median ms | TPOT median ms | ITL median ms | ITL p99 ms |"
    rows = [head, "|" + "---|" * 7]
    for lv in levels:
        rows.append(
            f"| {lv['concurrency']} | {lv['output_throughput']:.1f} | {lv['request_throughput']:.2f} | "
            f"{lv['ttft_ms']['median']:.1f} | {lv['tpot_ms']['median']:.1f} | {lv['itl_ms']['median']:.1f} | "
            f"{lv['itl_ms']['p99']:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="patchbay-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--vocab-size", type=int, default=None, help="sample prompt ids below this (default: ask /tokenize-free heuristics: 8000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    p.add_argument("--extra-body", default=None, help="JSON merged into every request (e.g. a guided_json constraint)")
    p.add_argument("--result-json", default=None)
    args = p.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    vocab = args.vocab_size or 8000
    extra = json.loads(args.extra_body) if args.extra_body else None
    levels = []
    if args.warmup:
        warm = random_prompts(args.warmup, args.input_len, vocab, seed=args.seed + 10_000)
        asyncio.run(run_level(args.base_url, model, warm, 8, args.warmup, args.api_key, extra))
    for i, conc in enumerate(args.concurrency):
        prompts = random_prompts(args.num_prompts, args.input_len, vocab, seed=args.seed + 1 + i)
        level = asyncio.run(run_level(args.base_url, model, prompts, args.output_len, conc, args.api_key, extra))
        levels.append(level)
        print(f"concurrency {conc}: {level['output_throughput']:.1f} output tok/s, "
              f"TTFT median {level['ttft_ms']['median']:.1f} ms, TPOT median {level['tpot_ms']['median']:.1f} ms, "
              f"failed {level['failed']}", file=sys.stderr)
    result = {"model": model, "input_len": args.input_len, "output_len": args.output_len,
              "num_prompts": args.num_prompts, "levels": levels}
    print(format_table(levels))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(lv["failed"] == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
