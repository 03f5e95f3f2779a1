"""patchbay-ray's command line: every flag of ``serve``, plus where and how Ray Serve runs it.

Pure Python (no Ray import), so it is tested without a cluster. The
patchbay part becomes a :class:`~patchbay.config.ServerConfig` exactly as
``serve`` builds it (``--config`` files and several models included); the Ray
part becomes Ray Serve's deployment options (:func:`deployment_options`).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Sequence

import attrs

from patchbay.config import ConfigError, ServerConfig, build_parser, config_from_given

#: the default Ray Serve application name
DEFAULT_NAME = "patchbay"


@attrs.frozen
class RayOptions:
    """What patchbay-ray was asked to do."""

    #: each replica's patchbay config (host / port: where Ray Serve's HTTP proxy listens)
    config: ServerConfig
    #: replicas (with autoscaling: the initial number; None there: Ray starts with min_replicas)
    num_replicas: int | None = 1
    #: an existing cluster (None: start a local one for the command's lifetime)
    address: str | None = None
    name: str = DEFAULT_NAME
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    #: Ray Serve autoscaling, on when min_replicas or max_replicas is given
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    #: requests Ray Serve sends one replica at once (None: what its models batch, the sum of max-num-seqs)
    max_ongoing_requests: int | None = None
    #: the dashboard of a local cluster (its status API lists the replicas)
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    list_plugins: bool = False

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


#: RayOptions field -> (flag, default shown, help)
_RAY_FLAGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "num_replicas": ("--num-replicas", {"type": int, "default": None, "metavar": "N"},
                     "replicas of the app, each with its own engine and model copy (default: 1; with "
                     "autoscaling: the initial number, default --min-replicas)"),
    "address": ("--address", {"default": None, "metavar": "ADDR"},
                "the Ray cluster to run on (default: $RAY_ADDRESS; with neither, a local cluster started for "
                "this command's lifetime)"),
    "name": ("--name", {"default": DEFAULT_NAME}, "the Ray Serve application's name"),
    "num_cpus_per_replica": ("--num-cpus-per-replica", {"type": float, "default": 1.0, "metavar": "X"},
                             "CPUs Ray reserves for each replica (its torch threads too, unless --cpu-threads)"),
    "num_gpus_per_replica": ("--num-gpus-per-replica", {"type": float, "default": 0.0, "metavar": "X"},
                             "GPUs Ray reserves for each replica (its models then run on cuda)"),
    "min_replicas": ("--min-replicas", {"type": int, "default": None, "metavar": "N"},
                     "autoscaling: fewest replicas (turns Ray Serve's autoscaling on)"),
    "max_replicas": ("--max-replicas", {"type": int, "default": None, "metavar": "N"},
                     "autoscaling: most replicas (turns Ray Serve's autoscaling on)"),
    "target_ongoing_requests": ("--target-ongoing-requests", {"type": float, "default": None, "metavar": "X"},
                                "autoscaling: requests per replica it aims at (Ray's default: 2)"),
    "upscale_delay_s": ("--upscale-delay-s", {"type": float, "default": None, "metavar": "S"},
                        "autoscaling: seconds of high load before adding replicas"),
    "downscale_delay_s": ("--downscale-delay-s", {"type": float, "default": None, "metavar": "S"},
                          "autoscaling: seconds of low load before removing replicas"),
    "max_ongoing_requests": ("--max-ongoing-requests", {"type": int, "default": None, "metavar": "N"},
                             "requests one replica gets at once (default: the sum of its models' --max-num-seqs)"),
    "dashboard_host": ("--dashboard-host", {"default": "127.0.0.1", "metavar": "HOST"}, "the local cluster's dashboard address"),
    "dashboard_port": ("--dashboard-port", {"type": int, "default": 8265, "metavar": "PORT"}, "the local cluster's dashboard port"),
}


def build_parser_ray() -> argparse.ArgumentParser:
    """serve's parser with a group of Ray Serve flags."""
    p = build_parser()
    p.prog = "patchbay-ray"
    p.description = ("Serve patchbay on Ray Serve: the same app as `serve`, as replicas behind Ray Serve's HTTP "
                     "proxy (--host / --port). Takes every flag of serve, and these:")
    group = p.add_argument_group("Ray Serve")
    for dest, (flag, kwargs, help_text) in _RAY_FLAGS.items():
        shown = kwargs.get("default")
        if dest == "address":
            shown = None
        group.add_argument(flag, dest=dest, help=help_text + (f" (default: {shown})" if shown is not None else ""),
                           **kwargs)
    return p


def _check(opts: RayOptions) -> RayOptions:
    def at_least(flag: str, value: float | None, low: float) -> None:
        if value is not None and value < low:
            raise ConfigError(flag, f"must be at least {low:g} (got {value:g})")

    at_least("--num-replicas", opts.num_replicas, 1)
    at_least("--num-cpus-per-replica", opts.num_cpus_per_replica, 0)
    at_least("--num-gpus-per-replica", opts.num_gpus_per_replica, 0)
    at_least("--min-replicas", opts.min_replicas, 0)
    at_least("--max-replicas", opts.max_replicas, 1)
    at_least("--max-ongoing-requests", opts.max_ongoing_requests, 1)
    if opts.target_ongoing_requests is not None and opts.target_ongoing_requests <= 0:
        raise ConfigError("--target-ongoing-requests", "must be positive")
    if not opts.autoscaling and (opts.target_ongoing_requests or opts.upscale_delay_s or opts.downscale_delay_s):
        raise ConfigError("--target-ongoing-requests", "autoscaling flags need --min-replicas or --max-replicas")
    if opts.autoscaling:
        low, high = _bounds(opts)
        if low > high:
            raise ConfigError("--min-replicas", f"{low} is more than --max-replicas {high}")
        if opts.num_replicas is not None and not low <= opts.num_replicas <= high:
            raise ConfigError("--num-replicas", f"the initial {opts.num_replicas} replicas must lie within "
                              f"--min-replicas {low} and --max-replicas {high}")
    if not 1 <= opts.dashboard_port <= 65535:
        raise ConfigError("--dashboard-port", f"must be a port number (got {opts.dashboard_port})")
    return opts


def _bounds(opts: RayOptions) -> tuple[int, int]:
    """Autoscaling's (min, max): min defaults to 1, max to the larger of min and the initial number."""
    low = 1 if opts.min_replicas is None else opts.min_replicas
    high = opts.max_replicas if opts.max_replicas is not None else max(low, opts.num_replicas or 1)
    return low, high


def _absolute(path: str | None, kind: str) -> str | None:
    """A local path made absolute (a replica's working directory is not the command's); anything
    else as it is (an inline chat template, ``auto``, or a path that only the cluster's nodes hold)."""
    if path is None:
        return None
    local = Path(path).expanduser()
    try:
        ok = local.is_dir() if kind == "dir" else local.is_file()
    except OSError:  # e.g. an inline template too long to be a file name
        ok = False
    return str(local.resolve()) if ok else path


def replica_config(config: ServerConfig, num_cpus: float) -> ServerConfig:
    """Each model's config as a replica runs it: torch threads default to the CPUs Ray reserved for
    it; local paths are absolute (the served names stay as given)."""
    threads = max(1, math.floor(num_cpus))

    def one(c: ServerConfig) -> ServerConfig:
        if c.model is None:
            return c if c.cpu_threads is not None else attrs.evolve(c, cpu_threads=threads)
        return attrs.evolve(
            c, cpu_threads=threads if c.cpu_threads is None else c.cpu_threads,
            served_model_name=c.served_names(), model=_absolute(c.model, "dir"),
            tokenizer=_absolute(c.tokenizer, "dir"), chat_template=_absolute(c.chat_template, "file"),
            generation_config=c.generation_config if c.generation_config in ("auto", "vllm")
            else _absolute(c.generation_config, "dir"))

    return attrs.evolve(one(config), models=tuple(one(m) for m in config.models))


def parse(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> RayOptions:
    """patchbay-ray's options; a mistake is a :class:`ConfigError` naming the flag."""
    parser = build_parser_ray()
    given = dict(vars(parser.parse_args(argv)))
    ray = {dest: given.pop(dest) for dest in _RAY_FLAGS}
    env = os.environ if environ is None else environ
    ray["address"] = ray["address"] or env.get("RAY_ADDRESS") or None
    if ray["num_replicas"] is None and ray["min_replicas"] is None and ray["max_replicas"] is None:
        ray["num_replicas"] = 1
    list_plugins = bool(given.pop("list_plugins", False))
    config = config_from_given(given)
    return _check(RayOptions(config=replica_config(config, ray["num_cpus_per_replica"]), list_plugins=list_plugins,
                             **ray))


def deployment_options(opts: RayOptions) -> dict[str, Any]:
    """Ray Serve's ``@serve.deployment`` options for these options."""
    actor: dict[str, Any] = {"num_cpus": opts.num_cpus_per_replica}
    if opts.num_gpus_per_replica:
        actor["num_gpus"] = opts.num_gpus_per_replica
    ongoing = opts.max_ongoing_requests or sum(c.max_num_seqs for c in opts.config.model_configs())
    out: dict[str, Any] = {"name": "PatchbayServer", "ray_actor_options": actor, "max_ongoing_requests": ongoing}
    if not opts.autoscaling:
        out["num_replicas"] = opts.num_replicas
        return out
    low, high = _bounds(opts)
    scaling: dict[str, Any] = {"min_replicas": low, "max_replicas": high}
    for key in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
        value = getattr(opts, key)
        if value is not None:
            scaling[key] = value
    if opts.num_replicas is not None:
        scaling["initial_replicas"] = opts.num_replicas
    out["autoscaling_config"] = scaling
    return out
