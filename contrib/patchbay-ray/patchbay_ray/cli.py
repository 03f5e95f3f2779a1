"""The ``patchbay-ray`` console script: patchbay as replicas on Ray Serve.

It checks what ``serve`` checks (flags, plugins, model directories and
families) before touching Ray, connects to the cluster (``--address`` or
``$RAY_ADDRESS``) or starts a local one, starts Ray Serve's HTTP proxy on
``--host`` / ``--port``, deploys the application at ``/`` and waits. SIGINT
or SIGTERM deletes the application and shuts Ray Serve down (replicas and
proxy stop, as ``serve run`` does); a local cluster is stopped, one given
with ``--address`` keeps running.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Sequence

import attrs

from patchbay.cli import preflight, setup_logging
from patchbay.config import ConfigError
from patchbay.registry import StartupError
from patchbay_ray.options import RayOptions, deployment_options, parse

log = logging.getLogger("patchbay.ray")


def _shown(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _connect(opts: RayOptions) -> bool:
    """Connect to the cluster, or start a local one; True when this command started it."""
    if opts.address is None:
        # a single-machine cluster: every Ray process binds and talks on loopback only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if opts.address is not None:
        ray.init(address=opts.address, logging_level=logging.WARNING)
        log.info("connected to the Ray cluster at %s", opts.address)
        return False
    ray.init(address="local", include_dashboard=True,
             dashboard_host=opts.dashboard_host, dashboard_port=opts.dashboard_port, logging_level=logging.WARNING)
    log.info("started a local Ray cluster for this command (dashboard: http://%s:%d)",
             _shown(opts.dashboard_host), opts.dashboard_port)
    return True


def _stop(opts: RayOptions, started: bool) -> None:
    """Delete the application, shut Ray Serve down, and stop the cluster this command started."""
    import ray
    from ray import serve

    try:
        serve.delete(opts.name)
    except Exception as exc:  # noqa: BLE001 - shut down whatever is left all the same
        log.warning("deleting application %r: %s", opts.name, exc)
    try:
        serve.shutdown()
    finally:
        if started:
            ray.shutdown()


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _on_signal(*_: object) -> None:
    raise _Stop()


def _catch_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def run(opts: RayOptions) -> int:
    """Deploy and serve until SIGINT / SIGTERM (then 0; a failed deploy: 1)."""
    from ray import serve

    from patchbay_ray.deployment import application

    _catch_signals()
    started = connected = False
    try:
        started = _connect(opts)
        connected = True
        _catch_signals()  # again: Ray's core installs a SIGTERM handler of its own (it aborts)
        config = opts.config
        serve.start(http_options={"host": config.host, "port": config.port})
        options = deployment_options(opts)
        t0 = time.monotonic()
        serve.run(application(config, options), name=opts.name, route_prefix="/", blocking=False)
        replicas = options.get("num_replicas") or options["autoscaling_config"]
        log.info("application %r (replicas: %s) ready in %.1f s at http://%s:%d (OpenAI API under /v1)",
                 opts.name, replicas, time.monotonic() - t0, _shown(config.host), config.port)
        while True:
            time.sleep(3600)
    except _Stop:
        log.info("stopping: deleting application %r and shutting Ray Serve down", opts.name)
        return 0
    except Exception as exc:  # noqa: BLE001 - a failed deploy: say why, clean up, non-zero
        print(f"patchbay-ray: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        if connected:
            _stop(opts, started)


def main(argv: Sequence[str] | None = None) -> int:
    # C++ kernels are built per environment: a build shared with another venv (other include paths)
    # would be rebuilt by each in turn
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    try:
        opts = parse(argv)
    except ConfigError as exc:
        print(f"patchbay-ray: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(opts.config.log_level)
    try:
        if opts.list_plugins:
            from patchbay.plugins import format_plugin_list, load_plugins

            print(format_plugin_list(load_plugins(opts.config.plugins).infos))
            return 0
        opts = attrs.evolve(opts, config=preflight(opts.config))
    except (StartupError, ConfigError) as exc:
        print(f"patchbay-ray: error: {exc}", file=sys.stderr)
        return 1
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
