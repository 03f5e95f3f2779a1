"""The server's one configuration object, built from CLI flags.

Flags are named as vLLM names them where vLLM has the flag. Validation
errors name the flag (:class:`ConfigError`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Sequence

import attrs
import cattrs

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")


class ConfigError(ValueError):
    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def parse_size(text: str | int) -> int:
    """Bytes from ``"4GiB"``, ``"512M"``, ``"1073741824"``."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 4GiB, 512MiB or a number of bytes)")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(number * ((1024 if binary or unit else 1000) ** power))


@attrs.frozen
class ServerConfig:
    model: str | None = None
    tokenizer: str | None = None
    served_model_name: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int = 8000
    max_model_len: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    api_key: tuple[str, ...] = ()
    chat_template: str | None = None
    cpu_threads: int | None = None
    seed: int = 0
    plugins: tuple[str, ...] | None = None
    log_level: str = "info"
    enable_log_requests: bool = False
    max_request_body_bytes: int = 32 * 1024 * 1024
    scheduling_policy: str = "fcfs"
    max_logprobs: int = 20
    generation_config: str = "auto"
    trust_request_chat_template: bool = False
    chat_template_content_format: str = "auto"
    response_role: str = "assistant"
    enable_request_id_headers: bool = False
    runner: str = "auto"
    convert: str = "auto"
    structured_outputs_backend: str = "auto"
    structured_outputs_disable_any_whitespace: bool = False
    structured_outputs_timeout: float = 10.0

    def validate(self) -> "ServerConfig":
        positive = {
            "--port": self.port,
            "--max-num-seqs": self.max_num_seqs,
            "--max-num-batched-tokens": self.max_num_batched_tokens,
            "--block-size": self.block_size,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(flag, f"must be at least 1 (got {value})")
        if self.port > 65535:
            raise ConfigError("--port", f"must be at most 65535 (got {self.port})")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("--max-model-len", f"must be at least 1 (got {self.max_model_len})")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError("--cpu-threads", f"must be at least 1 (got {self.cpu_threads})")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ConfigError("--kv-cache-memory", f"must be a positive size (got {self.kv_cache_memory})")
        if self.dtype not in DTYPES:
            raise ConfigError("--dtype", f"must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError("--scheduling-policy", f"must be fcfs or priority (got {self.scheduling_policy!r})")
        if self.max_logprobs < 0:
            raise ConfigError("--max-logprobs", f"must be at least 0 (got {self.max_logprobs})")
        if self.chat_template_content_format not in ("auto", "string", "openai"):
            raise ConfigError("--chat-template-content-format", "must be auto, string or openai")
        if not self.response_role:
            raise ConfigError("--response-role", "must not be empty")
        if self.structured_outputs_timeout <= 0:
            raise ConfigError("--structured-outputs-compile-timeout", "must be positive")
        if any(not k for k in self.api_key):
            raise ConfigError("--api-key", "must not be empty")
        return self

    def to_json(self) -> str:
        return json.dumps(cattrs.unstructure(self))

    @classmethod
    def from_json(cls, text: str) -> "ServerConfig":
        return cattrs.structure(json.loads(text), cls)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve",
        description="Serve a model over the OpenAI API. With no MODEL, serves a tiny bundled demo chat model.",
    )
    p.add_argument("model", nargs="?", default=None, help="local Hugging Face model directory (default: the demo model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="names the API accepts (default: MODEL)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one step at most")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument(
        "--kv-cache-memory",
        type=_size_arg,
        default=None,
        help="bytes for the KV cache, e.g. 4GiB (default: what max-num-seqs x max-model-len needs, capped at 4GiB)",
    )
    prefix = p.add_mutually_exclusive_group()
    prefix.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True)
    prefix.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require this bearer token (repeatable; or env PATCHBAY_API_KEY)",
    )
    p.add_argument("--chat-template", default=None, help="a chat template file or an inline Jinja string")
    p.add_argument("--scheduling-policy", default="fcfs", choices=("fcfs", "priority"),
                   help="fcfs, or priority (a request's lower `priority` runs first and can preempt)")
    p.add_argument("--max-logprobs", type=int, default=20, help="most logprobs / top_logprobs a request may ask for")
    p.add_argument("--generation-config", default="auto",
                   help="auto: defaults from the model's generation_config.json; vllm: none; or a directory holding one")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="allow requests to bring their own chat_template")
    p.add_argument("--chat-template-content-format", default="auto", choices=("auto", "string", "openai"),
                   help="how message content is handed to the template (auto: detected from the template)")
    p.add_argument("--response-role", default="assistant", help="the role of generated chat messages")
    p.add_argument("--enable-request-id-headers", action="store_true",
                   help="echo X-Request-Id (or the generated id) back as a response header")
    p.add_argument("--runner", default="auto", choices=("auto", "generate", "pooling"),
                   help="generate text, or pool (embeddings / classification); auto: generate when the model can")
    p.add_argument("--convert", default="auto", choices=("auto", "none", "embed", "classify"),
                   help="serve a model as an embedder (last-token pooling for decoders) or classifier")
    p.add_argument("--structured-outputs-config", default=None,
                   help='JSON, e.g. \'{"backend": "outlines", "disable_any_whitespace": true}\'; backends: auto, '
                        'outlines, lm-format-enforcer, or any installed decoding plugin')
    p.add_argument("--guided-decoding-backend", default=None, help="the older spelling of the default backend")
    p.add_argument("--structured-outputs-compile-timeout", type=float, default=10.0,
                   help="seconds a constraint may take to compile before the request gets a 400")
    p.add_argument("--cpu-threads", type=int, default=None, help="torch threads (default: chosen by model size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plugins", default=None, help="comma-separated plugin names to load (default: all installed)")
    p.add_argument("--list-plugins", action="store_true", help="print the installed plugins and exit")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--enable-log-requests", action="store_true", help="log each request's parameters")
    return p


_SO_KEYS = {"backend", "disable_any_whitespace", "disable_fallback", "disable_additional_properties",
            "reasoning_parser"}


def _structured_outputs(args: argparse.Namespace) -> tuple[str, bool]:
    backend, no_ws = "auto", False
    if args.structured_outputs_config:
        try:
            cfg = json.loads(args.structured_outputs_config)
        except json.JSONDecodeError as exc:
            raise ConfigError("--structured-outputs-config", f"not JSON: {exc}") from None
        if not isinstance(cfg, dict):
            raise ConfigError("--structured-outputs-config", "must be a JSON object")
        unknown = set(cfg) - _SO_KEYS
        if unknown:
            raise ConfigError("--structured-outputs-config", f"unknown keys {sorted(unknown)}; known: {sorted(_SO_KEYS)}")
        if cfg.get("reasoning_parser"):
            raise ConfigError("--structured-outputs-config", "reasoning_parser is not supported")
        if cfg.get("disable_additional_properties"):
            raise ConfigError("--structured-outputs-config", "disable_additional_properties is not supported")
        backend = str(cfg.get("backend", backend))
        no_ws = bool(cfg.get("disable_any_whitespace", False))
    if args.guided_decoding_backend:
        backend = args.guided_decoding_backend
    return backend, no_ws


def config_from_args(argv: Sequence[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    so_backend, so_no_ws = _structured_outputs(args)
    keys = tuple(args.api_key or ())
    if not keys and os.environ.get("PATCHBAY_API_KEY"):
        keys = (os.environ["PATCHBAY_API_KEY"],)
    plugins: Any = None
    if args.plugins is not None:
        plugins = tuple(n.strip() for n in args.plugins.split(",") if n.strip())
    config = ServerConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        served_model_name=tuple(args.served_model_name or ()),
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching,
        api_key=keys,
        chat_template=args.chat_template,
        cpu_threads=args.cpu_threads,
        seed=args.seed,
        plugins=plugins,
        log_level=args.log_level,
        enable_log_requests=args.enable_log_requests,
        scheduling_policy=args.scheduling_policy,
        max_logprobs=args.max_logprobs,
        generation_config=args.generation_config,
        trust_request_chat_template=args.trust_request_chat_template,
        chat_template_content_format=args.chat_template_content_format,
        response_role=args.response_role,
        enable_request_id_headers=args.enable_request_id_headers,
        runner=args.runner,
        convert=args.convert,
        structured_outputs_backend=so_backend,
        structured_outputs_disable_any_whitespace=so_no_ws,
        structured_outputs_timeout=args.structured_outputs_compile_timeout,
    )
    return config.validate(), args
