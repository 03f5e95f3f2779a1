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
    model_impl: str = "auto"
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
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", self.model_impl):
            raise ConfigError("--model-impl", f"must be auto, native (or vllm), transformers or another "
                                              f"implementation's name (got {self.model_impl!r})")
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


def _default(name: str) -> Any:
    return attrs.fields_dict(ServerConfig)[name].default


def build_parser() -> argparse.ArgumentParser:
    """serve's flags. Defaults are :class:`ServerConfig`'s (a flag not given is absent from the
    parsed namespace), so they are declared once; help texts show them."""
    p = argparse.ArgumentParser(
        prog="serve",
        description="Serve a model over the OpenAI API. With no MODEL, serves a plugin's default model "
                    "(the bundled demo chat model).",
        argument_default=argparse.SUPPRESS,
    )

    def flag(*names: str, help: str = "", **kwargs: Any) -> None:
        dest = kwargs.get("dest") or names[0].lstrip("-").replace("-", "_")
        shown = kwargs.pop("shown", None)
        if shown is None and dest in attrs.fields_dict(ServerConfig):
            shown = _default(dest)
        if shown not in (None, False, (), ""):
            help = f"{help} (default: {shown})" if help else f"default: {shown}"
        p.add_argument(*names, help=help or None, **kwargs)

    flag("model", nargs="?", help="local Hugging Face model directory", shown="the demo model")
    flag("--tokenizer", help="tokenizer directory", shown="the model's")
    flag("--served-model-name", nargs="+", help="names the API accepts", shown="MODEL")
    flag("--host")
    flag("--port", type=int)
    flag("--max-model-len", type=int, help="context length", shown="the model's")
    flag("--dtype", choices=DTYPES)
    flag("--device", help="cpu, cuda, cuda:N or auto")
    flag("--max-num-seqs", type=int, help="sequences in one batch at most")
    flag("--max-num-batched-tokens", type=int, help="tokens in one step at most")
    flag("--block-size", type=int, help="tokens per KV cache block")
    flag("--kv-cache-memory", type=_size_arg, help="bytes for the KV cache, e.g. 4GiB",
         shown="what max-num-seqs x max-model-len needs, capped at 4GiB")
    flag("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
         help="reuse cached KV blocks of shared prompt prefixes")
    flag("--api-key", action="append", help="require this bearer token (repeatable; or env PATCHBAY_API_KEY)")
    flag("--chat-template", help="a chat template file or an inline Jinja string")
    flag("--scheduling-policy", choices=("fcfs", "priority"),
         help="fcfs, or priority (a request's lower `priority` runs first and can preempt)")
    flag("--max-logprobs", type=int, help="most logprobs / top_logprobs a request may ask for")
    flag("--generation-config",
         help="auto: defaults from the model's generation_config.json; vllm: none; or a directory holding one")
    flag("--trust-request-chat-template", action="store_true", help="allow requests to bring their own chat_template")
    flag("--chat-template-content-format", choices=("auto", "string", "openai"),
         help="how message content is handed to the template (auto: detected from the template)")
    flag("--response-role", help="the role of generated chat messages")
    flag("--enable-request-id-headers", action="store_true",
         help="echo X-Request-Id (or the generated id) back as a response header")
    flag("--runner", choices=("auto", "generate", "pooling"),
         help="generate text, or pool (embeddings / classification); auto: generate when the model can")
    flag("--convert", choices=("auto", "none", "embed", "classify"),
         help="serve a model as an embedder (last-token pooling for decoders) or classifier")
    flag("--model-impl", metavar="IMPL",
         help="which modelling code serves the model: native (vLLM's word: vllm) — a family of its own; "
              "transformers — transformers' modelling code over patchbay's paged KV cache; auto — native "
              "when a family runs the architecture, else the fallback")
    flag("--structured-outputs-config",
         help='JSON, e.g. \'{"backend": "outlines", "disable_any_whitespace": true}\'; backends: auto, '
              'outlines, lm-format-enforcer, or any installed decoding plugin')
    flag("--guided-decoding-backend", help="the older spelling of the default backend")
    flag("--structured-outputs-compile-timeout", type=float, dest="structured_outputs_timeout", metavar="SECONDS",
         help="seconds a constraint may take to compile before the request gets a 400")
    flag("--cpu-threads", type=int, help="torch threads", shown="chosen by model size")
    flag("--seed", type=int)
    flag("--plugins", help="comma-separated plugin names to load", shown="all installed")
    flag("--list-plugins", action="store_true", help="print the installed plugins and exit")
    flag("--log-level", choices=("debug", "info", "warning", "error"))
    flag("--enable-log-requests", action="store_true", help="log each request's parameters")
    return p


_SO_KEYS = {"backend", "disable_any_whitespace", "disable_fallback", "disable_additional_properties",
            "reasoning_parser"}


def _structured_outputs(given: dict[str, Any]) -> dict[str, Any]:
    """``--structured-outputs-config`` / ``--guided-decoding-backend`` as config fields."""
    out: dict[str, Any] = {}
    text = given.pop("structured_outputs_config", None)
    if text:
        try:
            cfg = json.loads(text)
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
        if "backend" in cfg:
            out["structured_outputs_backend"] = str(cfg["backend"])
        if "disable_any_whitespace" in cfg:
            out["structured_outputs_disable_any_whitespace"] = bool(cfg["disable_any_whitespace"])
    backend = given.pop("guided_decoding_backend", None)
    if backend:
        out["structured_outputs_backend"] = backend
    return out


def config_from_args(argv: Sequence[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """The config of serve's command line; what it does not say keeps :class:`ServerConfig`'s default."""
    args = build_parser().parse_args(argv)
    given = dict(vars(args))
    given.pop("list_plugins", None)
    given.update(_structured_outputs(given))
    keys = tuple(given.pop("api_key", ()) or ())
    if not keys and os.environ.get("PATCHBAY_API_KEY"):
        keys = (os.environ["PATCHBAY_API_KEY"],)
    if keys:
        given["api_key"] = keys
    if "plugins" in given:
        given["plugins"] = tuple(n.strip() for n in given["plugins"].split(",") if n.strip())
    if "served_model_name" in given:
        given["served_model_name"] = tuple(given["served_model_name"])
    args.list_plugins = vars(args).get("list_plugins", False)
    return ServerConfig(**given).validate(), args
