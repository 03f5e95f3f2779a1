"""``serve --config FILE.yaml``: flags from a YAML file, and several models in one server.

Each top-level key is a long flag without ``--`` (dashes or underscores
alike); ``true`` sets a switch and ``false`` its ``--no-`` form; a list gives
a flag several values; a mapping is handed over as JSON (e.g.
``structured-outputs-config``). Values go through serve's own parser, so
they are checked exactly as on the command line. A flag on the command line
wins over the file's, wherever it stands on the line.

One more key, ``models``, lists one mapping per model: ``model`` (a local
directory) and any per-model flag. A model's config is the defaults, then the
file's top level, then its entry, then the command line. Server-wide flags
(:data:`SERVER_WIDE`) only stand at the top level. Every mistake is a
:class:`~patchbay.config.ConfigError` naming the file, the entry and the key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from patchbay.config import ConfigError, ServerConfig, config_fields, env_api_key

#: flags that belong to the server, not to one model (config field names)
SERVER_WIDE = frozenset({
    "host", "port", "api_key", "plugins", "log_level", "enable_log_requests", "enable_request_id_headers",
    "max_request_body_bytes", "enable_offline_docs",
    # one responses store per server: response ids are global, and previous_response_id may switch models
    "responses_store", "responses_store_max_entries", "responses_store_max_bytes",
})
#: what a config file may not say: commands and the file itself
_NOT_SETTINGS = frozenset({"--help", "-h", "--list-plugins", "--config"})


def _key_flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(where, f"cannot take {type(value).__name__} {value!r}")


def _tokens(key: str, value: Any, action: argparse.Action, where: str) -> list[str]:
    """The command-line words one key of the file stands for."""
    flag = _key_flag(key)
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(where, f"is a switch: give true or false (got {value!r})")
        return [flag if value else "--no-" + flag[2:]]
    if value is None:
        raise ConfigError(where, "has no value")
    if isinstance(value, bool):
        raise ConfigError(where, f"is not a switch: give it a value (got {value!r})")
    if isinstance(value, list):
        if not value:
            raise ConfigError(where, "is an empty list")
        if action.nargs in ("+", "*"):
            return [flag, *(_scalar(v, where) for v in value)]
        if isinstance(action, argparse._AppendAction):
            return [word for v in value for word in (flag, _scalar(v, where))]
        raise ConfigError(where, f"takes one value, not a list (got {value!r})")
    return [f"{flag}={_scalar(value, where)}"]


def _parse(mapping: dict[str, Any], parser: argparse.ArgumentParser, where: str) -> dict[str, Any]:
    """:class:`ServerConfig` fields of one mapping of the file (the top level or one model's entry)."""
    words: list[str] = []
    given: dict[str, Any] = {}
    for key, value in mapping.items():
        at = f"{where}{key}"
        if not isinstance(key, str):
            raise ConfigError(at, "keys are flag names")
        if key == "model":
            if not isinstance(value, str) or not value:
                raise ConfigError(at, f"must be a model directory (got {value!r})")
            given["model"] = value
            continue
        flag = _key_flag(key)
        action = parser._option_string_actions.get(flag)  # exact names only: no abbreviations in a file
        if action is None or flag in _NOT_SETTINGS:
            raise ConfigError(at, f"unknown key {key!r}: keys are serve's long flags without '--' (see serve --help)")
        if flag != action.option_strings[0]:  # a --no- form
            raise ConfigError(at, f"write {action.option_strings[0][2:]}: false")
        words += _tokens(key, value, action, at)

    def refuse(message: str) -> None:
        raise ConfigError(where.rstrip(": ") or "config", message)

    saved, parser.error = parser.error, refuse  # type: ignore[method-assign,assignment]
    try:
        parsed = vars(parser.parse_args(words))
    finally:
        parser.error = saved  # type: ignore[method-assign]
    return config_fields({**parsed, **given})


def _read(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("--config", f"{path!r} is not a file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path}: must be a mapping of flag names to values")
    return data


def _validated(fields: dict[str, Any], where: str) -> ServerConfig:
    try:
        return ServerConfig(**fields).validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc.flag}", exc.message) from None


def config_from_file(path: str, cli: dict[str, Any], parser: argparse.ArgumentParser) -> ServerConfig:
    """The config ``serve --config path`` describes, with ``cli`` (the command line's config fields,
    only those given) winning over the file."""
    data = _read(path)
    entries = data.pop("models", None)
    top = _parse(data, parser, f"{path}: ")
    if entries is None:  # exactly the single-model command line
        return _validated(env_api_key({**top, **cli}), f"{path}: ")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: models", "must be a list of mappings, one per model")
    for fields, said in ((cli, "a MODEL argument"), (top, "a top-level 'model'")):
        if "model" in fields:
            raise ConfigError(f"{path}: models", f"cannot stand together with {said}: list every model in 'models'")
        if "served_model_name" in fields:
            raise ConfigError(f"{path}: models", "give each model its served-model-name in its own entry, "
                              "not at the top level or on the command line")
    server = env_api_key({k: v for k, v in {**top, **cli}.items() if k in SERVER_WIDE})
    configs = []
    for i, entry in enumerate(entries):
        where = f"{path}: models[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"must be a mapping with 'model' and per-model flags (got {entry!r})")
        if "model" not in entry:
            raise ConfigError(where, "has no 'model' (a local model directory)")
        own = _parse(entry, parser, f"{where}.")
        shared = sorted(k for k in own if k in SERVER_WIDE)
        if shared:
            keys = ", ".join(repr(k.replace("_", "-")) for k in shared)
            raise ConfigError(f"{where}.{shared[0].replace('_', '-')}",
                              f"{keys} {'is' if len(shared) == 1 else 'are'} server-wide: set it at the top level")
        configs.append(_validated({**top, **own, **cli, **server}, f"{where} ({own['model']}): "))
    _check_names(configs, path)
    return _validated({**top, **cli, **server, "models": tuple(configs)}, f"{path}: ")


def _check_names(configs: list[ServerConfig], path: str) -> None:
    seen: dict[str, int] = {}
    for i, config in enumerate(configs):
        for name in config.served_names():
            if name in seen:
                where = "twice in the same entry" if seen[name] == i else f"by models[{seen[name]}] and models[{i}]"
                raise ConfigError(f"{path}: models[{i}].served-model-name",
                                  f"the served name {name!r} is used {where}; every name (aliases included) "
                                  "must be unique across the file")
            seen[name] = i
