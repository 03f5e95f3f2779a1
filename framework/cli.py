"""The ``serve`` console script.

The main process checks everything it can cheaply (flags, plugins, model
directory and family) so mistakes stop start-up with a clear message; then
Granian serves the app from one worker process, which builds the app
(loading the model) through :func:`app_from_env`. One worker owns the engine:
a second would load a second copy of the model.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from typing import Sequence

from patchbay.config import ConfigError, ServerConfig, config_from_args
from patchbay.registry import StartupError

CONFIG_ENV = "PATCHBAY_SERVER_CONFIG"
log = logging.getLogger("patchbay")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(levelname)s %(asctime)s [%(name)s] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def preflight(config: ServerConfig) -> ServerConfig:
    """Fail fast in the main process: plugins import, a model is given (or offered), each model's
    directory exists, a family runs it. Returns the config with its model resolved."""
    from patchbay.loader import pick_family, resolve_model_dir, with_default_model
    from patchbay.plugins import load_plugins
    from patchbay.serving import model_named
    from patchbay.served import check_parser_flags

    plugins = load_plugins(config.plugins)
    registries = plugins.build_registries()
    config = with_default_model(config, plugins)
    configs = config.model_configs()
    for i, one in enumerate(configs):
        with model_named(configs, i):
            check_parser_flags(one, registries)
            pick_family(resolve_model_dir(one), registries, config=one)
    return config


def preflight_apart(config: ServerConfig) -> ServerConfig:
    """:func:`preflight` in a forked child, so the main process — which stays up as Granian's supervisor for
    the server's whole life — never imports the plugins, torch or a model's libraries (about 220 MB it would
    hold for nothing: the worker imports them again). Errors come back as if raised here."""
    if not hasattr(os, "fork"):
        return preflight(config)
    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one answer down the pipe, then gone without running the parent's exit hooks
        os.close(read)
        try:
            answer = ["ok", preflight(config).to_json()]
        except StartupError as exc:
            answer = ["startup", str(exc)]
        except ConfigError as exc:
            answer = ["config", [exc.flag, exc.message]]
        except BaseException:  # noqa: BLE001 - shown by the parent, as an uncaught exception would be
            answer = ["crash", traceback.format_exc()]
        with os.fdopen(write, "w") as pipe:
            json.dump(answer, pipe)
        logging.shutdown()
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        raise StartupError(f"start-up checks died ({_exit_text(status)}) before answering")
    kind, value = json.loads(text)
    if kind == "ok":
        return ServerConfig.from_json(value)
    if kind == "config":
        raise ConfigError(*value)
    if kind == "startup":
        raise StartupError(value)
    raise StartupError(f"start-up checks failed:\n{value}")


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def app_from_env():
    """Granian's factory target: the app for the config the main process put in the environment."""
    config = ServerConfig.from_json(os.environ[CONFIG_ENV])
    setup_logging(config.log_level)
    # one OpenMP thread for every thread but the engines' (each sets its own count: --cpu-threads): a second
    # thread running parallel regions keeps its own worker pool, and libgomp then stops spinning between
    # regions for everyone (see Serving.build). Read once, when torch loads libgomp: before any import of torch.
    os.environ["OMP_NUM_THREADS"] = "1"
    from patchbay.app import create_app

    app = create_app(config)
    shown = "localhost" if config.host in ("0.0.0.0", "::", "") else config.host

    def announce() -> None:
        names = ", ".join(app.state.serving.model_names)
        log.info("serving %s at http://%s:%d (OpenAI API under /v1)", names, shown, config.port)

    app.on_startup.append(announce)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, args = config_from_args(argv)
    except ConfigError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    try:
        if args.list_plugins:
            from patchbay.plugins import format_plugin_list, load_plugins

            print(format_plugin_list(load_plugins(config.plugins).infos))
            return 0
        config = preflight_apart(config)
    except (StartupError, ConfigError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1

    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    os.environ[CONFIG_ENV] = config.to_json()
    server = Granian(
        "patchbay.cli:app_from_env",
        factory=True,
        address=config.host,
        port=config.port,
        interface=Interfaces.ASGI,
        workers=1,
        log_level=LogLevels(config.log_level),
        respawn_failed_workers=False,
    )
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
