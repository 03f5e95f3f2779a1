"""Images through the HTTP server versus transformers, in the same run: Llava chat and CLIP image embeddings.

    .venv/bin/python benchmarks/vision_bench.py [--size bench|tiny] [--requests 32] [--concurrency 8]
        [--max-tokens 32] [--embed-batches 8] [--batch 32] [--repeats 3] [--threads 2] [--out vision.json]

Two rows, each racing a real ``serve`` process against transformers on the same weights:

- **chat**: ``--requests`` chat requests, each with one fresh image (a PNG data URL, 160x120, never seen
  before, so neither the prefix cache nor the encoder cache helps) and fresh text, ``--concurrency`` at a
  time through the openai client, ``--max-tokens`` output tokens each (``ignore_eos``). The baseline is
  transformers' batched ``generate`` over batches of ``--concurrency`` requests (``AutoProcessor`` with
  left padding, ``min_new_tokens = max_new_tokens``), from the same PNG bytes (decoding included).
  Reported: output tokens per second of each.
- **embed**: ``--embed-batches`` Cohere ``/v2/embed`` requests of ``--batch`` fresh images each (CLIP image
  embeddings) against ``CLIPImageProcessor`` + ``get_image_features`` at batch ``--batch`` on the same PNGs.
  Reported: images per second of each.

After an untimed warm-up of each, rounds alternate server / transformers ``--repeats`` times (a shared machine's load hits both alike); the
medians are reported, with their ratio, and written as JSON to ``--out``. ``--size tiny`` runs the test
suite's tiny models (a smoke run: numbers mean nothing); ``bench`` builds (once, cached) a Llava of a CLIP
tower of 112x112 images (14x14 patches: 64 placeholders, 4 layers of 256) and a Llama of 512 x 8 layers,
and a CLIP of the same vision tower.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

from patchbay_bench.serveproc import start_serve, stop_serve  # noqa: E402

WORDS = ("look at this picture and tell me what the river stone bridge garden window light field road shows "
         "about summer winter morning evening").split()


def models(size: str) -> tuple[Path, Path]:
    from patchbay_plugins.tinymodels import cached_clip, cached_llava

    if size == "tiny":
        return cached_llava(), cached_clip()
    vision = dict(image_size=112, patch_size=14)
    llava = cached_llava(dict(**vision, vision_hidden_size=256, vision_layers=4, vision_heads=4, hidden_size=512,
                              num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1408, vocab_size=8000,
                              max_position_embeddings=4096), name="bench-llava")
    clip = cached_clip(dict(**vision, hidden_size=256, num_layers=4, num_heads=4, projection_dim=256,
                            vocab_size=8000), name="bench-clip")
    return llava, clip


def fresh_png(rng: random.Random, width: int = 160, height: int = 120) -> bytes:
    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(rng.randrange(2**32))
    pixels = gen.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB").resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def fresh_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(12)) + f" ({rng.randrange(10**6)})"


# --------------------------------------------------------------------------- chat


def chat_server(url: str, jobs: list[tuple[str, bytes]], concurrency: int, max_tokens: int) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(job: tuple[str, bytes]) -> int:
        text, png = job
        r = client.chat.completions.create(
            model="llava", max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                                   {"type": "text", "text": text}]}])
        return r.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, jobs))
    return tokens / (time.perf_counter() - start)


def chat_transformers(model_dir: Path, jobs: list[tuple[str, bytes]], batch: int, max_tokens: int) -> float:
    import torch
    from PIL import Image

    processor, model = _hf_llava(model_dir)
    processor.tokenizer.padding_side = "left"
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(jobs), batch):
        group = jobs[i : i + batch]
        images = [Image.open(io.BytesIO(png)) for _, png in group]
        prompts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            add_generation_prompt=True, tokenize=False) for text, _ in group]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * len(group)
    return tokens / (time.perf_counter() - start)


_HF: dict = {}


def _hf_llava(model_dir: Path):
    if "llava" not in _HF:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(model_dir)
        if processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        _HF["llava"] = (processor, LlavaForConditionalGeneration.from_pretrained(model_dir).eval())
    return _HF["llava"]


# --------------------------------------------------------------------------- image embeddings


def embed_server(url: str, batches: list[list[bytes]]) -> float:
    with httpx.Client(timeout=600) as client:
        start = time.perf_counter()
        n = 0
        for pngs in batches:
            r = client.post(url + "/v2/embed", json={"model": "clip", "input_type": "image", "embedding_types": ["float"],
                                                     "images": [data_url(p) for p in pngs]})
            r.raise_for_status()
            n += len(r.json()["embeddings"]["float"])
    return n / (time.perf_counter() - start)


def embed_transformers(model_dir: Path, batches: list[list[bytes]]) -> float:
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPModel

    if "clip" not in _HF:
        _HF["clip"] = (AutoImageProcessor.from_pretrained(model_dir), CLIPModel.from_pretrained(model_dir).eval())
    processor, model = _HF["clip"]
    start = time.perf_counter()
    n = 0
    for pngs in batches:
        inputs = processor([Image.open(io.BytesIO(p)) for p in pngs], return_tensors="pt")
        with torch.inference_mode():
            out = model.get_image_features(**inputs)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        torch.nn.functional.normalize(out, dim=-1)
        n += len(pngs)
    return n / (time.perf_counter() - start)


# --------------------------------------------------------------------------- the race


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("bench", "tiny"), default="bench")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--embed-batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server and of transformers")
    p.add_argument("--port", type=int, default=8931)
    p.add_argument("--out", default="vision_bench.json")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    llava_dir, clip_dir = models(args.size)
    rng = random.Random(0)
    rows: dict[str, dict[str, list[float]]] = {"chat": {"server": [], "transformers": []},
                                               "embed": {"server": [], "transformers": []}}
    logs = Path(tempfile.mkdtemp(prefix="vision-bench-"))
    for name, model_dir, served in (("chat", llava_dir, "llava"), ("embed", clip_dir, "clip")):
        proc = start_serve(model_dir, args.port, ["--served-model-name", served, "--cpu-threads", str(args.threads)],
                           logs / f"{name}.log", threads=args.threads)
        url = f"http://127.0.0.1:{args.port}"
        try:
            # warm-up, untimed: first-use costs (kernels, allocator, transformers' lazy imports) hit neither row
            if name == "chat":
                warm = [(fresh_text(rng), fresh_png(rng)) for _ in range(2)]
                chat_server(url, warm, 2, 2)
                chat_transformers(llava_dir, warm, 2, 2)
            else:
                warm_batches = [[fresh_png(rng) for _ in range(2)]]
                embed_server(url, warm_batches)
                embed_transformers(clip_dir, warm_batches)
            for _ in range(args.repeats):
                if name == "chat":
                    def jobs():
                        return [(fresh_text(rng), fresh_png(rng)) for _ in range(args.requests)]

                    rows[name]["server"].append(chat_server(url, jobs(), args.concurrency, args.max_tokens))
                    rows[name]["transformers"].append(chat_transformers(llava_dir, jobs(), args.concurrency,
                                                                        args.max_tokens))
                else:
                    def batches():
                        return [[fresh_png(rng) for _ in range(args.batch)] for _ in range(args.embed_batches)]

                    rows[name]["server"].append(embed_server(url, batches()))
                    rows[name]["transformers"].append(embed_transformers(clip_dir, batches()))
                print(f"{name}: server {rows[name]['server'][-1]:.1f}, transformers "
                      f"{rows[name]['transformers'][-1]:.1f}", file=sys.stderr)
        finally:
            stop_serve(proc)
    result = {"args": vars(args), "models": {"llava": str(llava_dir), "clip": str(clip_dir)}, "rows": {}}
    for name, unit in (("chat", "output tokens/s"), ("embed", "images/s")):
        server, hf = statistics.median(rows[name]["server"]), statistics.median(rows[name]["transformers"])
        result["rows"][name] = {"unit": unit, "server": server, "transformers": hf, "ratio": server / hf,
                                "rounds": rows[name]}
        print(f"{name:6s} {unit:16s} server {server:9.1f}  transformers {hf:9.1f}  ratio {server / hf:5.2f}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
