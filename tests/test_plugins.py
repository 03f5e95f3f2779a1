"""Plugin discovery, allowlists, start-up failures, and the hooks' own guard tests."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import httpx
import pytest
from litestar import get

from apikit import api_client
from patchbay import hookimpl, hookspecs
from patchbay.plugins import format_plugin_list, load_plugins
from patchbay.registry import LogitsProcessorSpec, ModelFamily, ReasoningParserSpec, StartupError, ToolParserSpec
from serverkit import run_serve, serve

ROOT = Path(__file__).resolve().parent.parent
PKGS = Path(__file__).parent / "plugin_pkgs"
BUILTIN = {"models", "completions", "chat", "health", "llama"}
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "patchbay_spec")]


# --------------------------------------------------------------------------- in-process


def test_builtin_plugins_are_entry_points_with_kinds():
    infos = {i.name: i for i in load_plugins().infos}
    assert BUILTIN <= set(infos)
    assert infos["chat"].kind == "endpoint" and infos["llama"].kind == "model"
    assert infos["chat"].distribution == "patchbay"
    listing = format_plugin_list(list(infos.values()))
    assert re.search(r"^chat\s+endpoint\s+patchbay\s+0\.1\.0$", listing, re.M)


def test_allowlist_blocks_before_import_and_unknown_names_fail():
    plugins = load_plugins(["llama", "health"])
    assert {i.name for i in plugins.infos} == {"llama", "health"}
    assert plugins.manager.is_blocked("chat")
    with pytest.raises(StartupError, match="'nope'"):
        load_plugins(["llama", "nope"])


def test_import_failure_names_the_plugin(monkeypatch):
    import patchbay.plugins as mod

    real = mod._discover

    def fake():
        found = real()
        found["exploding"] = EntryPoint(name="exploding", value="patchbay_no_such_module_xyz", group="patchbay")
        return found

    monkeypatch.setattr(mod, "_discover", fake)
    with pytest.raises(StartupError, match="plugin 'exploding'.*failed to import.*ModuleNotFoundError"):
        load_plugins()
    assert {i.name for i in load_plugins(["llama"]).infos} == {"llama"}  # blocked before import


class Misspelt:
    @hookimpl
    def register_route(self, register):  # not a hook: must stop start-up
        pass


def test_misspelt_hook_stops_startup():
    with pytest.raises(StartupError, match="misspelt"):
        load_plugins(["llama"], extra=[("misspelt", Misspelt())])


class Greeter:
    """A throwaway endpoint plugin, registered in-process."""

    @hookimpl
    def register_routes(self, register):
        @get("/greet")
        async def greet() -> dict:
            return {"greeting": "hi"}

        register(greet)


def test_register_routes_adds_an_endpoint(tiny_llama):
    with api_client(tiny_llama, extra_plugins=[("greeter", Greeter())]) as c:
        assert c.get("/greet").json() == {"greeting": "hi"}
    with api_client(tiny_llama) as c:
        assert c.get("/greet").status_code == 404


class Clash:
    @hookimpl
    def register_routes(self, register):
        @get("/health")
        async def other_health() -> str:
            return "mine"

        register(other_health)


def test_duplicate_route_names_both_plugins(tiny_llama):
    with pytest.raises(StartupError, match=r"GET /health is registered twice: by '(health|clash)' and by '(clash|health)'"):
        with api_client(tiny_llama, extra_plugins=[("clash", Clash())]):
            pass


class SecondLlama:
    @hookimpl
    def register_model_families(self, register):
        register(ModelFamily(name="llama2", architectures=("LlamaForCausalLM",), tasks=frozenset({"generate"}),
                             load=lambda *a: None))


def test_register_model_families_detects_duplicates():
    plugins = load_plugins(["llama"], extra=[("second", SecondLlama())])
    with pytest.raises(StartupError, match="LlamaForCausalLM/generate' is registered twice: by '(second|llama)' and by '(llama|second)'"):
        plugins.build_registries()


class Extras:
    name = "toy-backend"

    @hookimpl
    def register_decoding_backends(self, register):
        register(self)

    @hookimpl
    def register_logits_processors(self, register):
        register(LogitsProcessorSpec("toy.Processor", lambda: None))

    @hookimpl
    def register_tool_parsers(self, register):
        register(ToolParserSpec("toy", lambda tokenizer: None))

    @hookimpl
    def register_reasoning_parsers(self, register):
        register(ReasoningParserSpec("toy-think", lambda tokenizer: None))


def test_register_decoding_backends():
    reg = load_plugins(["llama"], extra=[("extras", Extras())]).build_registries()
    assert reg.decoding_backends["toy-backend"].name == "toy-backend"
    with pytest.raises(StartupError, match="decoding backend 'toy-backend' is registered twice"):
        load_plugins(["llama"], extra=[("extras", Extras()), ("extras2", Extras())]).build_registries()


def test_register_logits_processors():
    reg = load_plugins(["llama"], extra=[("extras", Extras())]).build_registries()
    assert reg.logits_processors["toy.Processor"].qualname == "toy.Processor"


def test_register_tool_parsers():
    reg = load_plugins(["llama"], extra=[("extras", Extras())]).build_registries()
    assert reg.tool_parsers["toy"].name == "toy"
    builtin = load_plugins().build_registries().tool_parsers
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(builtin)
    with pytest.raises(StartupError, match="tool parser 'hermes' is registered twice"):
        clash = type("Clash", (), {"register_tool_parsers": hookimpl(
            lambda self, register: register(ToolParserSpec("hermes", lambda tokenizer: None)))})()
        load_plugins(["hermes"], extra=[("clash", clash)]).build_registries()


def test_register_reasoning_parsers():
    reg = load_plugins(["llama"], extra=[("extras", Extras())]).build_registries()
    assert reg.reasoning_parsers["toy-think"].name == "toy-think"
    assert {"deepseek_r1", "qwen3"} <= set(load_plugins(["think"]).build_registries().reasoning_parsers)
    assert {i.name: i.kind for i in load_plugins(["think", "hermes"]).infos} == {
        "think": "reasoning-parser", "hermes": "tool-parser"}


class Failing:
    @hookimpl
    def register_routes(self, register):
        raise ValueError("cannot register")


def test_hook_that_raises_names_its_plugin():
    with pytest.raises(StartupError, match="plugin 'failing' failed in register_routes: ValueError"):
        load_plugins(["llama"], extra=[("failing", Failing())]).build_registries()


# --------------------------------------------------------------------------- guard tests


class OffersTinyLlama:
    def __init__(self, path):
        self.path = path

    @hookimpl
    def default_model(self):
        from patchbay.registry import DefaultModel

        return DefaultModel(path=self.path, name="offered", what="a test model")


def test_default_model_hook_supplies_the_model_when_none_is_given(tiny_llama):
    from litestar.testing import TestClient

    from patchbay.app import create_app
    from patchbay.config import ServerConfig

    config = ServerConfig(cpu_threads=1, max_model_len=128).validate()
    app = create_app(config, extra_plugins=[("offers", OffersTinyLlama(tiny_llama))])
    with TestClient(app) as c:
        models = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["offered"] and models[0]["root"] == str(tiny_llama)
    # a plugin's offer wins over the builtin demo (which answers last); none at all is a clear start-up error
    with pytest.raises(StartupError, match="no model given.*demo"):
        create_app(ServerConfig(plugins=("llama", "health")).validate())


def test_every_hook_is_documented():
    readme = (ROOT / "README.md").read_text()
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc) > 40, f"hook {name} needs a real docstring"
        assert f"`{name}`" in readme, f"hook {name} is not documented in README.md"


def test_every_hook_has_a_test():
    source = Path(__file__).read_text()
    for name in HOOKS:
        assert f"def test_{name}" in source or re.search(rf"def test_\w*{name}", source), f"no test for {name}"


# --------------------------------------------------------------------------- installed for real


def pip_install(pkg: Path, target: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(pkg)],
        check=True, capture_output=True, text=True,
    )
    return target


@pytest.fixture(scope="module")
def hello_site(tmp_path_factory) -> Path:
    return pip_install(PKGS / "patchbay-hello", tmp_path_factory.mktemp("hello-site"))


def test_list_plugins_shows_an_installed_third_party_plugin(hello_site):
    out = run_serve(["--list-plugins"], env={"PYTHONPATH": str(hello_site)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(re.fullmatch(r"hello\s+endpoint\s+patchbay-hello\s+0\.3\.0", line) for line in lines), out.stdout
    assert {line.split()[0] for line in lines} >= BUILTIN | {"hello"}


@pytest.mark.e2e
def test_installed_plugin_adds_an_endpoint_and_allowlist_removes_it(hello_site, tiny_llama, tmp_path):
    env = {"PYTHONPATH": str(hello_site)}
    with serve([str(tiny_llama), "--served-model-name", "tiny"], tmp_path, env=env) as s:
        assert httpx.get(s.url + "/hello").json() == {"hello": "world", "models": ["tiny"]}
    allow = ",".join(sorted(BUILTIN))
    with serve([str(tiny_llama), "--plugins", allow], tmp_path, env=env) as s:
        assert httpx.get(s.url + "/hello").status_code == 404
        assert httpx.get(s.url + "/v1/models").status_code == 200


def test_broken_plugin_stops_startup_with_its_name(tmp_path_factory, tiny_llama):
    site = pip_install(PKGS / "patchbay-broken", tmp_path_factory.mktemp("broken-site"))
    out = run_serve([str(tiny_llama)], env={"PYTHONPATH": str(site)})
    assert out.returncode != 0
    assert "plugin 'broken'" in out.stderr and "broken on purpose" in out.stderr
    assert "Traceback" not in out.stderr
    # leaving it out with --plugins lets the server past the plugin stage
    out = run_serve(["--list-plugins", "--plugins", "llama,chat"], env={"PYTHONPATH": str(site)})
    assert out.returncode == 0 and "broken" not in out.stdout


def test_unknown_plugin_name_and_bad_flags_stop_startup(tiny_llama):
    out = run_serve([str(tiny_llama), "--plugins", "llama,chatt"])
    assert out.returncode != 0 and "'chatt'" in out.stderr
    out = run_serve([str(tiny_llama), "--max-num-seqs", "0"])
    assert out.returncode != 0 and "--max-num-seqs" in out.stderr
    out = run_serve(["/no/such/model"])
    assert out.returncode != 0 and "/no/such/model" in out.stderr
    out = run_serve([str(tiny_llama), "--plugins", "chat,health"])
    assert out.returncode != 0 and "no loaded model family" in out.stderr
