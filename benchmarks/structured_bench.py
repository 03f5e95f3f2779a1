"""Structured-output benchmark of docs/benchmarks.md.

1. Compile time per backend for a 5-field schema and for a nested Pydantic
   model's schema, on the benchmark model's tokenizer (vocab 8000): the first
   compile (with the backend's one-off per-tokenizer setup) and a second one
   of a fresh spec.
2. Output tokens/s at concurrency 8 through ``serve`` with every request
   JSON-constrained (``guided_json``) versus none, on the ~34M benchmark
   model, alternating the runs; medians.

    .venv/bin/python benchmarks/structured_bench.py --repeats 3 --out bench-results/structured.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional

from patchbay_bench.serveproc import start_serve, stop_serve

BIN = Path(sys.executable).parent

FIVE_FIELDS = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "kind": {"enum": ["story", "poem", "note"]},
        "draft": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "summary", "kind", "draft", "tags"],
    "additionalProperties": False,
}


def pydantic_schema() -> dict:
    from openai.lib._pydantic import to_strict_json_schema
    from pydantic import BaseModel, Field

    class Address(BaseModel):
        street: str
        city: Literal["Paris", "Rome", "Oslo"]
        zip: str = Field(pattern=r"^[0-9]{4}$")

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        name: str

    class Person(BaseModel):
        name: str
        home: Address
        pet: Optional[Pet]
        tags: list[str]

    return to_strict_json_schema(Person)


def compile_times(model_dir: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from patchbay.decoding import ConstraintSpec
    from patchbay.tokenizer_info import build_tokenizer_info
    from patchbay_plugins.decoding.lmfe_backend import LmfeBackend
    from patchbay_plugins.decoding.outlines_backend import OutlinesBackend

    tok = AutoTokenizer.from_pretrained(model_dir)
    info = build_tokenizer_info(tok, 8000, [2, 4])
    rows = []
    for name, make in (("outlines", OutlinesBackend), ("lm-format-enforcer", LmfeBackend)):
        for label, schema in (("5-field schema", FIVE_FIELDS), ("nested Pydantic schema", pydantic_schema())):
            backend = make()
            t = time.perf_counter()
            backend.compile(ConstraintSpec("json", schema), info)
            first = time.perf_counter() - t
            variant = json.loads(json.dumps(schema))
            variant["title"] = "second"
            t = time.perf_counter()
            backend.compile(ConstraintSpec("json", variant), info)
            second = time.perf_counter() - t
            rows.append({"backend": name, "schema": label, "first_ms": first * 1000, "second_ms": second * 1000})
    return rows


def throughput(model_dir: Path, repeats: int, out: Path) -> dict:
    port = 8755
    proc = start_serve(model_dir, port, ["--cpu-threads", "2", "--served-model-name", "bench", "--max-model-len",
                                         "1024", "--log-level", "warning"], out.with_suffix(".serve.log"), threads=2)
    try:
        modes = {
            "none": None,
            "outlines": {"guided_json": FIVE_FIELDS, "guided_decoding_backend": "outlines"},
            "lm-format-enforcer": {"guided_json": FIVE_FIELDS, "guided_decoding_backend": "lm-format-enforcer"},
        }
        results: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(repeats):
            for mode, extra in modes.items():
                res = out.with_suffix(f".{mode}.{r}.json")
                cmd = [str(BIN / "patchbay-bench"), "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "32",
                       "--input-len", "128", "--output-len", "128", "--concurrency", "8", "--seed", str(100 + r),
                       "--result-json", str(res)]
                if extra:
                    cmd += ["--extra-body", json.dumps(extra)]
                subprocess.run(cmd, check=True, capture_output=True)
                level = json.loads(res.read_text())["levels"][0]
                results[mode].append(level["output_throughput"])
                print(f"run {r} {mode}: {level['output_throughput']:.1f} tok/s "
                      f"({level['total_output_tokens']} tokens)", file=sys.stderr)
        return {m: {"median": statistics.median(v), "runs": v} for m, v in results.items()}
    finally:
        stop_serve(proc)


def main() -> None:
    from patchbay_plugins.tinymodels import benchmark_model_config, cached_model

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-results/structured.json")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = cached_model("bench-llama-float32", benchmark_model_config("float32"))
    result = {"compile": compile_times(model_dir), "throughput_c8": throughput(model_dir, args.repeats, out)}
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
