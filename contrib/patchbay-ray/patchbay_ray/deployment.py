"""The Ray Serve deployment: each replica builds the patchbay app exactly as ``serve`` does.

One deployment, mounted at ``/``. A replica gets the config as JSON (as
``serve``'s Granian worker does), builds the app with
:func:`patchbay.app.create_app` (its own engines and model copies), and
answers through Ray Serve's HTTP proxy; Ray runs the app's start-up and
shut-down (engines start and stop with the replica). Ray's health check asks
every engine: a dead one gets the replica replaced.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from patchbay.config import ServerConfig
from patchbay_ray.asgi import ReplicaHeader

log = logging.getLogger("patchbay.ray")


def _log_to_stderr(level: str) -> None:
    """patchbay's log lines go to the replica's stderr (Ray forwards it to the driver), formatted as
    ``serve`` formats them; Ray's own logging is left alone."""
    logger = logging.getLogger("patchbay")
    if not any(getattr(h, "_patchbay", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%H:%M:%S"))
        handler._patchbay = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


@serve.ingress()
class PatchbayServer:
    def __init__(self, config_json: str):
        self.config = ServerConfig.from_json(config_json)
        self.patchbay_app: Any = None

    def __serve_build_asgi_app__(self) -> ReplicaHeader:
        from patchbay.app import create_app

        _log_to_stderr(self.config.log_level)
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.patchbay_app = create_app(self.config)
        log.info("replica %s serves %s", replica_id, ", ".join(self.patchbay_app.state.serving.model_names))
        return ReplicaHeader(self.patchbay_app, replica_id)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: every engine of this replica must live."""
        if self.patchbay_app is None:
            return
        for model in self.patchbay_app.state.serving.models:
            if model.dead is not None:
                raise RuntimeError(f"model {model.names[0]!r}: {model.dead}")


def application(config: ServerConfig, options: dict[str, Any]) -> Any:
    """The Ray Serve application: one deployment of :class:`PatchbayServer` with ``options``."""
    return serve.deployment(PatchbayServer).options(**options).bind(config.to_json())


def build_app(args: dict[str, Any]) -> Any:
    """An application builder for Ray Serve config files (``import_path:
    patchbay_ray.deployment:build_app``, as a KubeRay ``RayService`` uses): ``args["argv"]`` holds
    patchbay-ray's command-line words (serve's flags, ``--config``, ``--num-replicas``, ...).
    Where the proxy listens and which cluster runs it are the Serve config's business."""
    from patchbay_ray.options import deployment_options, parse

    argv = args.get("argv", [])
    if isinstance(argv, str):
        import shlex

        argv = shlex.split(argv)
    opts = parse([str(word) for word in argv])
    return application(opts.config, deployment_options(opts))
