"""patchbay-ray without a cluster: its flags, the Ray Serve options they map onto, the replica
header, the deployment it binds, and the mistakes that stop it before Ray starts."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from patchbay.config import ConfigError, build_parser
from patchbay_ray.asgi import HEADER, ReplicaHeader
from patchbay_ray.options import build_parser_ray, deployment_options, parse

SCRIPT = str(Path(sys.executable).with_name("patchbay-ray"))


def flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


# --------------------------------------------------------------------------- flags


def test_it_takes_every_flag_of_serve_and_its_own():
    ours = flags(build_parser_ray())
    assert flags(build_parser()) <= ours
    assert {"--num-replicas", "--address", "--name", "--num-cpus-per-replica", "--num-gpus-per-replica",
            "--min-replicas", "--max-replicas", "--target-ongoing-requests", "--max-ongoing-requests"} <= ours
    out = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ours - {"-h"}:
        assert flag in out.stdout, flag


def test_serves_flags_build_the_config_serve_would(tiny_llama):
    opts = parse([str(tiny_llama), "--served-model-name", "tiny", "--max-model-len", "128", "--api-key", "k",
                  "--host", "127.0.0.1", "--port", "8100"], environ={})
    assert opts.config.model == str(tiny_llama) and opts.config.served_names() == ("tiny",)
    assert opts.config.max_model_len == 128 and opts.config.api_key == ("k",) and opts.config.port == 8100
    assert (opts.num_replicas, opts.address, opts.name, opts.num_cpus_per_replica) == (1, None, "patchbay", 1.0)
    assert opts.config.cpu_threads == 1  # a replica's torch threads: the CPUs Ray reserved for it
    assert parse([str(tiny_llama), "--num-cpus-per-replica", "2.5"], environ={}).config.cpu_threads == 2
    assert parse([str(tiny_llama), "--num-cpus-per-replica", "2", "--cpu-threads", "1"], environ={}).config.cpu_threads == 1


def test_address_comes_from_the_flag_else_ray_address(tiny_llama):
    assert parse([str(tiny_llama)], environ={"RAY_ADDRESS": "10.0.0.1:6379"}).address == "10.0.0.1:6379"
    assert parse([str(tiny_llama), "--address", "auto"], environ={"RAY_ADDRESS": "x:1"}).address == "auto"
    assert parse([str(tiny_llama)], environ={}).address is None


def test_relative_paths_become_absolute_and_names_stay_as_given(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_llama.parent)
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    opts = parse([tiny_llama.name, "--chat-template", str(template)], environ={})
    assert opts.config.model == str(tiny_llama) and opts.config.served_names() == (tiny_llama.name,)
    assert opts.config.chat_template == str(template)
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert parse([tiny_llama.name, "--chat-template", inline], environ={}).config.chat_template == inline


def test_a_config_file_with_several_models_reaches_every_replica(tiny_llama, tiny_encoder, tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(textwrap.dedent(f"""
        api-key: k
        max-num-seqs: 8
        models:
          - {{model: {tiny_llama}, served-model-name: [chat, c], max-num-seqs: 4}}
          - {{model: {tiny_encoder}, served-model-name: emb, cpu-threads: 2}}
    """))
    opts = parse(["--config", str(path), "--num-replicas", "3"], environ={})
    chat, emb = opts.config.models
    assert chat.served_names() == ("chat", "c") and emb.served_names() == ("emb",)
    assert (chat.cpu_threads, emb.cpu_threads) == (1, 2) and opts.config.api_key == ("k",)
    assert deployment_options(opts)["max_ongoing_requests"] == 4 + 8  # what its models batch at once
    with pytest.raises(ConfigError, match="unknown key 'num-replicas'"):  # Ray's flags stay on the command line
        path.write_text(f"num-replicas: 2\nmodel: {tiny_llama}\n")
        parse(["--config", str(path)], environ={})


# --------------------------------------------------------------------------- Ray Serve's options


def test_fixed_replicas_map_onto_the_deployment(tiny_llama):
    opts = parse([str(tiny_llama), "--num-replicas", "2", "--num-cpus-per-replica", "1.5", "--max-num-seqs", "16"],
                 environ={})
    assert deployment_options(opts) == {"name": "PatchbayServer", "num_replicas": 2, "max_ongoing_requests": 16,
                                        "ray_actor_options": {"num_cpus": 1.5}}
    gpus = deployment_options(parse([str(tiny_llama), "--num-gpus-per-replica", "1", "--max-ongoing-requests", "64"],
                                    environ={}))
    assert gpus["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0} and gpus["max_ongoing_requests"] == 64


def test_autoscaling_bounds_map_onto_rays_autoscaling_config(tiny_llama):
    m = str(tiny_llama)
    out = deployment_options(parse([m, "--min-replicas", "1", "--max-replicas", "4", "--num-replicas", "2",
                                    "--target-ongoing-requests", "8", "--upscale-delay-s", "5",
                                    "--downscale-delay-s", "60"], environ={}))
    assert "num_replicas" not in out
    assert out["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                         "target_ongoing_requests": 8.0, "upscale_delay_s": 5.0,
                                         "downscale_delay_s": 60.0}
    assert deployment_options(parse([m, "--max-replicas", "3"], environ={}))["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 3}
    assert deployment_options(parse([m, "--min-replicas", "0", "--max-replicas", "2"], environ={}))[
        "autoscaling_config"]["min_replicas"] == 0  # scale to zero


@pytest.mark.parametrize("argv, message", [
    (["--num-replicas", "0"], "--num-replicas: must be at least 1"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas: 3 is more than --max-replicas 2"),
    (["--min-replicas", "1", "--max-replicas", "2", "--num-replicas", "5"], "--num-replicas: the initial 5"),
    (["--target-ongoing-requests", "4"], "autoscaling flags need --min-replicas or --max-replicas"),
    (["--num-cpus-per-replica", "-1"], "--num-cpus-per-replica: must be at least 0"),
    (["--max-ongoing-requests", "0"], "--max-ongoing-requests: must be at least 1"),
    (["--max-num-seqs", "0"], "--max-num-seqs: must be at least 1"),  # serve's own checks
])
def test_mistakes_are_named(tiny_llama, argv, message):
    with pytest.raises(ConfigError) as info:
        parse([str(tiny_llama), *argv], environ={})
    assert message in str(info.value)


def test_mistakes_stop_the_command_before_ray_starts(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run([SCRIPT, str(tmp_path / "gone")], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "is not a local Hugging Face model directory" in out.stderr
    assert "Traceback" not in out.stderr and "Ray" not in out.stderr
    out = subprocess.run([SCRIPT, "--num-replicas", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "--num-replicas: must be at least 1" in out.stderr


# --------------------------------------------------------------------------- the replica's app


def test_every_http_response_names_the_replica():
    sent: list[dict] = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            sent.append({"lifespan": True})
            return
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})

    async def send(message):
        sent.append(message)

    wrapped = ReplicaHeader(app, "abc123")
    asyncio.run(wrapped({"type": "http"}, None, send))
    asyncio.run(wrapped({"type": "lifespan"}, None, send))
    start = sent[0]
    assert start["status"] == 401
    assert start["headers"] == [(b"content-type", b"text/plain"), (HEADER.lower().encode(), b"abc123")]
    assert [m.get("body") for m in sent[1:3]] == [b"a", b"b"] and sent[3] == {"lifespan": True}
    assert wrapped.app is app


def test_the_deployment_binds_one_replica_class_with_the_config(tiny_llama):
    from patchbay.config import ServerConfig
    from patchbay_ray.deployment import PatchbayServer, application

    opts = parse([str(tiny_llama), "--served-model-name", "tiny", "--num-replicas", "2"], environ={})
    app = application(opts.config, deployment_options(opts))
    deployment = app._bound_deployment
    assert deployment.name == "PatchbayServer" and deployment.num_replicas == 2
    assert deployment.ray_actor_options["num_cpus"] == 1.0
    (config_json,) = app._bound_deployment.init_args
    assert ServerConfig.from_json(config_json) == opts.config
    assert re.search(r"def __serve_build_asgi_app__", Path(sys.modules[PatchbayServer.__module__].__file__).read_text())


def test_health_check_fails_when_an_engine_died():
    from patchbay_ray.deployment import PatchbayServer

    alive = SimpleNamespace(names=["a"], dead=None)
    dead = SimpleNamespace(names=["b"], dead="the engine stopped: boom")
    app = SimpleNamespace(state=SimpleNamespace(serving=SimpleNamespace(models=[alive, dead])))
    with pytest.raises(RuntimeError, match="model 'b': the engine stopped: boom"):
        PatchbayServer.check_health(SimpleNamespace(patchbay_app=app))
    app.state.serving.models = [alive]
    PatchbayServer.check_health(SimpleNamespace(patchbay_app=app))
    PatchbayServer.check_health(SimpleNamespace(patchbay_app=None))  # not built yet: nothing to ask


def test_a_serve_config_file_builds_the_same_application(tiny_llama):
    """KubeRay's RayService deploys through a Serve config: ``import_path: patchbay_ray.deployment:build_app``."""
    from patchbay_ray.deployment import build_app

    words = [str(tiny_llama), "--served-model-name", "tiny", "--num-replicas", "3", "--num-gpus-per-replica", "1"]
    for argv in (words, " ".join(words)):
        deployment = build_app({"argv": argv})._bound_deployment
        assert deployment.num_replicas == 3 and deployment.ray_actor_options["num_gpus"] == 1.0
    with pytest.raises(ConfigError, match="--num-replicas"):
        build_app({"argv": [str(tiny_llama), "--num-replicas", "0"]})
