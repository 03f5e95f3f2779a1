"""Helpers for tests that drive the engine directly (no HTTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from patchbay.config import ServerConfig
from patchbay.engine.params import RequestOutput, SamplingParams
from patchbay.plugins import load_plugins
from patchbay.served import ServedModel
from patchbay.serving import Serving


def build_serving(model_dir: Path, **overrides: Any) -> ServedModel:
    """The served model of ``model_dir`` (its engine not started)."""
    overrides.setdefault("cpu_threads", 1)
    overrides.setdefault("max_model_len", 512)
    config = ServerConfig(model=str(model_dir), **overrides).validate()
    registries = load_plugins().build_registries()
    return Serving.build(config, registries).models[0]


async def collect(engine, rid: str, prompt: list[int], params: SamplingParams, **kw: Any) -> RequestOutput:
    """Run one request to the end; returns one merged output (all tokens and text)."""
    tokens: list[int] = []
    text = ""
    last = None
    async for out in engine.generate(rid, prompt, params, **kw):
        tokens += out.token_ids
        text += out.text
        last = out
    assert last is not None and last.finished
    last.token_ids, last.text = tokens, text
    return last


def run_many(engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
             concurrent: bool = True, prefix: str = "r") -> list[RequestOutput]:
    plist = params if isinstance(params, list) else [params] * len(prompts)

    async def main() -> list[RequestOutput]:
        if concurrent:
            return list(await asyncio.gather(*(collect(engine, f"{prefix}{i}", p, pp)
                                               for i, (p, pp) in enumerate(zip(prompts, plist)))))
        return [await collect(engine, f"{prefix}{i}", p, pp) for i, (p, pp) in enumerate(zip(prompts, plist))]

    return asyncio.run(main())


def free_blocks_when_idle(engine) -> tuple[int, int]:
    """(free, total) blocks, read on the engine thread between steps."""
    import threading

    done = threading.Event()
    result: list[int] = []

    def read() -> None:
        bm = engine.scheduler.blocks
        result.extend([bm.num_free, bm.num_blocks])
        done.set()

    engine.call(read)
    assert done.wait(10), "engine did not answer"
    return result[0], result[1]
