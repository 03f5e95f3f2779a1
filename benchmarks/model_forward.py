"""One decode step of the benchmark model: transformers' own forward vs the llama family plugin.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_forward.py [--threads 2] [--ctx 128] [--dtype float32]

Both sides run the same random ~34M-parameter Llama (hidden 512, 8 layers),
batch B sequences with ``--ctx`` tokens of context each, and time one decode
step (forward + logits of B new tokens), median over ``--steps`` steps. The
transformers side uses its default attention (sdpa) with a DynamicCache
(``--hf-cache static`` for a StaticCache); ours uses the paged cache with
shuffled blocks, as the engine builds it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def setup_transformers(model, batch: int, ctx: int, steps: int, cache: str):
    from transformers import StaticCache

    ids = torch.randint(5, model.config.vocab_size, (batch, ctx))
    past = None
    if cache == "static":
        past = StaticCache(config=model.config, max_cache_len=ctx + steps + 8)
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
    past = out.past_key_values
    state = {"pos": ctx, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

    def step():
        with torch.inference_mode():
            pos = torch.tensor([state["pos"]])
            o = model(input_ids=state["tok"], past_key_values=past, use_cache=True, cache_position=pos)
        state["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)
        state["pos"] += 1

    return step


def setup_ours(model, batch: int, ctx: int, steps: int):
    from patchbay_kernels.attention import AttentionMetadata

    dtype = model.dtype
    block = 16
    max_len = ctx + steps + 8
    blocks_per_seq = -(-max_len // block)
    num_blocks = batch * blocks_per_seq + 1
    layout = model.kv_layout
    shape = (num_blocks, block, layout.num_kv_heads, layout.head_dim)
    kv = [(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)) for _ in range(layout.num_layers)]
    order = list(range(1, num_blocks))
    random.Random(0).shuffle(order)
    tables = torch.tensor(order).view(batch, blocks_per_seq)
    # slot of position p of sequence b
    all_slots = (tables.unsqueeze(-1) * block + torch.arange(block)).view(batch, -1)
    state = {"pos": ctx, "tok": torch.randint(5, model.vocab_size, (batch,))}

    def step():
        pos = state["pos"]
        n = pos + 1
        meta = AttentionMetadata(
            slot_mapping=all_slots[:, pos],
            num_decodes=batch,
            decode_slots=all_slots[:, :n],
            decode_ctx_lens=torch.full((batch,), n),
        )
        with torch.inference_mode():
            h = model.forward(state["tok"], torch.full((batch,), pos), kv, meta)
            logits = model.compute_logits(h)
        state["tok"] = logits.argmax(-1)
        state["pos"] += 1

    return step


def interleaved_ms(fns, steps: int, warmup: int = 3) -> list[tuple[float, float]]:
    """(median, min) ms of each fn, timing them alternately so both see the same machine noise."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [(statistics.median(ts) * 1e3, min(ts) * 1e3) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hf-cache", default="dynamic", choices=["dynamic", "static"])
    ap.add_argument(
        "--overhead",
        action="store_true",
        help="a same-depth model with hidden 64 and vocab 512, where GEMMs cost ~nothing: per-step framework overhead",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model

    config = benchmark_model_config(args.dtype)
    if args.overhead:
        config.update(hidden_size=64, intermediate_size=176, vocab_size=512)
    model_dir = cached_model("benchmark-overhead" if args.overhead else "benchmark", config)
    dtype = getattr(torch, args.dtype)
    print(f"model {model_dir}\nthreads {args.threads}, ctx {args.ctx}, dtype {args.dtype}, hf cache {args.hf_cache}")
    print("ms per decode step, median (min) over interleaved steps")
    print(f"{'batch':>5} {'transformers':>16} {'ours':>16} {'speed-up':>9} {'ours tok/s':>10}")
    from transformers import AutoConfig, AutoModelForCausalLM

    from patchbay_plugins.models import llama

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    from pathlib import Path

    from patchbay.model import LoadRequest

    our_model = llama.load(LoadRequest(model_dir=Path(model_dir), hf_config=AutoConfig.from_pretrained(model_dir),
                                       task="generate", dtype=dtype, device=torch.device("cpu")))
    for b in (int(x) for x in args.batches.split(",")):
        hf_step = setup_transformers(hf_model, b, args.ctx, args.steps + 3, args.hf_cache)
        our_step = setup_ours(our_model, b, args.ctx, args.steps + 3)
        (hf, hf_min), (ours, ours_min) = interleaved_ms([hf_step, our_step], args.steps)
        print(
            f"{b:>5} {hf:>8.2f} ({hf_min:>5.2f}) {ours:>8.2f} ({ours_min:>5.2f}) {hf / ours:>8.2f}x {b / ours * 1e3:>10.0f}"
        )


if __name__ == "__main__":
    main()
