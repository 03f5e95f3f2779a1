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
#: what --limit-mm-per-prompt may name (vLLM's words); this server takes images
MODALITIES = ("image", "audio", "video")


class ConfigError(ValueError):
    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


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
    max_inputs_per_request: int = 2048
    max_waiting_seqs: int = 1024
    enable_offline_docs: bool = False
    chat_template_render_timeout: float = 2.0
    chat_template_max_chars: int = 8 * 1024 * 1024
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
    #: with ``--config`` listing ``models``: one config per model (this one holds the server-wide flags)
    models: tuple[ServerConfig, ...] = ()

    def model_configs(self) -> tuple[ServerConfig, ...]:
        """The config of each served model: the ``models`` of a config file, else this one."""
        return self.models or (self,)

    def served_names(self) -> tuple[str, ...]:
        """The names the API accepts for this model: ``--served-model-name``, else ``model`` as given."""
        return self.served_model_name or (str(self.model),)
    structured_outputs_memory_bytes: int = 2 * 1024**3
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False
    #: "memory", or "sqlite:PATH"
    responses_store: str = "memory"
    responses_store_max_entries: int = 1000
    responses_store_max_bytes: int = 256 * 1024 * 1024
    #: largest audio file /v1/audio/* accept (MiB; vLLM's VLLM_MAX_AUDIO_CLIP_FILESIZE_MB), and the most
    #: audio one realtime utterance may buffer
    max_audio_filesize_mb: float = 25.0
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    media_fetch_timeout: float = 5.0
    max_media_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 32 * 1024 * 1024
    max_media_redirects: int = 5
    limit_mm_per_prompt: dict[str, int] = attrs.field(factory=dict)
    encoder_cache_tokens: int = 8192

    def validate(self) -> "ServerConfig":
        positive = {
            "--port": self.port,
            "--max-num-seqs": self.max_num_seqs,
            "--max-num-batched-tokens": self.max_num_batched_tokens,
            "--block-size": self.block_size,
            "--max-inputs-per-request": self.max_inputs_per_request,
            "--max-waiting-seqs": self.max_waiting_seqs,
            "--max-request-body-size": self.max_request_body_bytes,
            "--structured-outputs-compile-memory": self.structured_outputs_memory_bytes,
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
        if self.chat_template_render_timeout <= 0:
            raise ConfigError("--chat-template-render-timeout", "must be positive")
        if self.chat_template_max_chars < 1:
            raise ConfigError("--chat-template-max-chars", "must be at least 1")
        if self.structured_outputs_timeout <= 0:
            raise ConfigError("--structured-outputs-compile-timeout", "must be positive")
        if self.max_audio_filesize_mb <= 0:
            raise ConfigError("--max-audio-filesize-mb", f"must be positive (got {self.max_audio_filesize_mb})")
        if any(not k for k in self.api_key):
            raise ConfigError("--api-key", "must not be empty")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ConfigError("--enable-auto-tool-choice", "needs --tool-call-parser NAME (the model's tool-call format)")
        if self.responses_store != "memory" and not (
                self.responses_store.startswith("sqlite:") and self.responses_store[len("sqlite:"):].strip()):
            raise ConfigError("--responses-store", f"must be memory or sqlite:PATH (got {self.responses_store!r})")
        if self.responses_store_max_entries < 1:
            raise ConfigError("--responses-store-max-entries", "must be at least 1")
        if self.responses_store_max_bytes < 1:
            raise ConfigError("--responses-store-max-bytes", "must be a positive size")
        self._validate_media()
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", self.model_impl):
            raise ConfigError("--model-impl", f"must be auto, native (or vllm), transformers or another "
                                              f"implementation's name (got {self.model_impl!r})")
        return self

    def _validate_media(self) -> None:
        if self.media_fetch_timeout <= 0:
            raise ConfigError("--media-fetch-timeout", "must be positive")
        for flag, value in (("--max-media-bytes", self.max_media_bytes), ("--max-image-pixels", self.max_image_pixels)):
            if value < 1:
                raise ConfigError(flag, f"must be at least 1 (got {value})")
        if self.max_media_redirects < 0:
            raise ConfigError("--max-media-redirects", f"must be at least 0 (got {self.max_media_redirects})")
        if self.encoder_cache_tokens < 0:
            raise ConfigError("--encoder-cache-tokens", f"must be at least 0 (got {self.encoder_cache_tokens})")
        if self.allowed_local_media_path is not None and not os.path.isdir(self.allowed_local_media_path):
            raise ConfigError("--allowed-local-media-path", f"{self.allowed_local_media_path!r} is not a directory")
        for kind, count in self.limit_mm_per_prompt.items():
            if kind not in MODALITIES:
                raise ConfigError("--limit-mm-per-prompt", f"unknown modality {kind!r}; known: {', '.join(MODALITIES)}")
            if not isinstance(count, int) or count < 0:
                raise ConfigError("--limit-mm-per-prompt", f"{kind}: must be a count of at least 0 (got {count!r})")

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
    flag("--max-waiting-seqs", type=int,
         help="sequences that may wait for a place in the batch; past it, requests get a 429 with Retry-After")
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
    flag("--trust-request-chat-template", action=argparse.BooleanOptionalAction, help="allow requests to bring their own chat_template")
    flag("--chat-template-content-format", choices=("auto", "string", "openai"),
         help="how message content is handed to the template (auto: detected from the template)")
    flag("--response-role", help="the role of generated chat messages")
    flag("--enable-request-id-headers", action=argparse.BooleanOptionalAction,
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
    flag("--structured-outputs-compile-memory", type=_size_arg, dest="structured_outputs_memory_bytes",
         help="memory (address space) of the worker process that builds a constraint's automaton; a compile "
              "that needs more gets a 400", shown="2GiB")
    flag("--max-request-body-size", type=_size_arg, dest="max_request_body_bytes",
         help="largest request body (a bigger one is a 413)", shown="32MiB")
    flag("--max-inputs-per-request", type=int,
         help="most inputs (texts, token-id lists, documents) one embeddings / pooling / score / rerank request may carry")
    flag("--enable-offline-docs", action=argparse.BooleanOptionalAction,
         help="serve /docs with Swagger UI's assets from the installed package instead of a CDN")
    flag("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction,
         help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser')
    flag("--tool-call-parser", help="the model's tool-call format: hermes, llama3_json, mistral, pythonic, or any "
                                    "installed tool-parser plugin")
    flag("--reasoning-parser", help="split reasoning from content: deepseek_r1, qwen3, or any installed "
                                    "reasoning-parser plugin")
    flag("--exclude-tools-when-tool-choice-none", action=argparse.BooleanOptionalAction,
         help='leave tools out of the prompt when tool_choice is "none"')
    flag("--responses-store", help="where /v1/responses keeps stored responses: memory, or sqlite:PATH "
                                   "(survives a restart)")
    flag("--responses-store-max-entries", type=int, help="stored responses kept at most (oldest go first)")
    flag("--responses-store-max-bytes", type=_size_arg, help="bytes of stored responses kept at most, e.g. 256MiB")
    flag("--max-audio-filesize-mb", type=float, metavar="MB",
         help="largest audio file /v1/audio/transcriptions and /translations accept (a larger one is a 413), "
              "and the most audio one /v1/realtime utterance may buffer")
    flag("--allowed-local-media-path", help="serve file:// image URLs from under this directory (default: refuse them)")
    flag("--allowed-media-domains", nargs="+",
         help="fetch image URLs only from these hosts (which may then be private addresses); default: any host "
              "whose addresses are all public")
    flag("--media-fetch-timeout", type=float, metavar="SECONDS", help="seconds one image download may take")
    flag("--max-media-bytes", type=_size_arg, help="largest image file accepted, e.g. 20MiB")
    flag("--max-image-pixels", type=int, help="most pixels (width x height) of one image, checked before decoding")
    flag("--max-media-redirects", type=int, help="redirects an image download may follow (0: none)")
    flag("--limit-mm-per-prompt", help='JSON, most items of a modality per prompt, e.g. \'{"image": 4}\'',
         shown="no limit")
    flag("--encoder-cache-tokens", type=int,
         help="image encoder outputs kept (in embedding rows) so a repeated image is not encoded again; 0: none")
    flag("--cpu-threads", type=int, help="torch threads", shown="chosen by model size")
    flag("--seed", type=int)
    flag("--plugins", help="comma-separated plugin names to load", shown="all installed")
    flag("--list-plugins", action="store_true", help="print the installed plugins and exit")
    flag("--log-level", choices=("debug", "info", "warning", "error"))
    flag("--enable-log-requests", action=argparse.BooleanOptionalAction, help="log each request's parameters")
    flag("--config", metavar="FILE.yaml",
         help="read flags from a YAML file (one key per long flag; `models` lists several models); "
              "flags on the command line win")
    return p


_SO_KEYS = {"backend", "disable_any_whitespace", "disable_fallback", "disable_additional_properties",
            "reasoning_parser"}


def _structured_outputs(given: dict[str, Any]) -> dict[str, Any]:
    """``--structured-outputs-config`` / ``--guided-decoding-backend`` as config fields."""
    out: dict[str, Any] = {}
    text = given.pop("structured_outputs_config", None)
    if text:
        cfg = _json_object("--structured-outputs-config", text)
        unknown = set(cfg) - _SO_KEYS
        if unknown:
            raise ConfigError("--structured-outputs-config", f"unknown keys {sorted(unknown)}; known: {sorted(_SO_KEYS)}")
        if cfg.get("reasoning_parser"):
            out["reasoning_parser"] = str(cfg["reasoning_parser"])
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


def _json_object(flag: str, text: str) -> dict[str, Any]:
    """A flag's JSON object value."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(flag, f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(flag, "must be a JSON object")
    return value


def config_fields(given: dict[str, Any]) -> dict[str, Any]:
    """:class:`ServerConfig` fields from the flags one parse holds (only those given)."""
    given = dict(given)
    given.pop("list_plugins", None)
    given.pop("config", None)
    so = _structured_outputs(given)
    if "reasoning_parser" in given:  # --reasoning-parser wins over the config's key
        so.pop("reasoning_parser", None)
    given.update(so)
    if "api_key" in given:
        given["api_key"] = tuple(given["api_key"])
    if "plugins" in given:
        given["plugins"] = tuple(n.strip() for n in given["plugins"].split(",") if n.strip())
    if "limit_mm_per_prompt" in given:
        limits = given["limit_mm_per_prompt"]  # JSON text on the command line, a mapping in a config file
        given["limit_mm_per_prompt"] = _json_object("--limit-mm-per-prompt", limits) if isinstance(limits, str) \
            else dict(limits)
    if "allowed_media_domains" in given:
        given["allowed_media_domains"] = tuple(given["allowed_media_domains"])
    if "served_model_name" in given:
        given["served_model_name"] = tuple(given["served_model_name"])
    return given


def env_api_key(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with ``$PATCHBAY_API_KEY`` as the API key when no flag gave one."""
    if not fields.get("api_key") and os.environ.get("PATCHBAY_API_KEY"):
        return {**fields, "api_key": (os.environ["PATCHBAY_API_KEY"],)}
    return fields


def config_from_args(argv: Sequence[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """The config of serve's command line (and of its ``--config`` file); what neither says keeps
    :class:`ServerConfig`'s default."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.list_plugins = vars(args).get("list_plugins", False)
    return config_from_given(vars(args), parser), args


def config_from_given(given: dict[str, Any], parser: argparse.ArgumentParser | None = None) -> ServerConfig:
    """The config of the flags one parse of :func:`build_parser`'s parser holds (only those given),
    reading the ``--config`` file when they name one (its keys are checked against ``parser``'s flags)."""
    if given.get("config"):
        from patchbay.configfile import config_from_file

        return config_from_file(given["config"], config_fields(given), parser or build_parser())
    return ServerConfig(**env_api_key(config_fields(given))).validate()
