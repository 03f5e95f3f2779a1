"""The model contract (patchbay.model) is enough, and checked: a third-party family written from it alone
is served like a builtin one; a family that forgets a member stops start-up, naming both; and the kernel
and the endpoints keep to their side of the line (guard tests over the source)."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from apikit import api_client
from patchbay import hookimpl
from patchbay.model import GenerativeModel, KVLayout, LoadRequest, protocol_members
from patchbay.registry import ModelFamily, StartupError

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- a family from the contract alone


class Wrapped:
    """Exactly the members GenerativeModel names, nothing else (``__slots__``): if the engine, runner,
    loader or an endpoint used anything more, serving it would fail."""

    __slots__ = ("dtype", "device", "vocab_size", "max_position_embeddings", "sliding_window", "kv_layout",
                 "num_parameters", "_inner")

    def __init__(self, inner):
        self._inner = inner
        self.dtype, self.device = inner.dtype, inner.device
        self.vocab_size, self.max_position_embeddings = inner.vocab_size, inner.max_position_embeddings
        self.sliding_window = inner.sliding_window
        self.kv_layout = KVLayout(inner.kv_layout.num_layers, inner.kv_layout.num_kv_heads, inner.kv_layout.head_dim)
        self.num_parameters = inner.num_parameters

    def forward(self, input_ids, positions, kv_caches, meta):
        return self._inner.forward(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden):
        return self._inner.compute_logits(hidden)


def wrapped_load(request: LoadRequest):
    from patchbay_plugins.models import llama

    return Wrapped(llama.load(request))


class WrappedFamily:
    @hookimpl
    def register_model_families(self, register):
        register(ModelFamily(name="wrapped", architectures=("WrappedForCausalLM",), tasks=frozenset({"generate"}),
                             load=wrapped_load))


class Forgetful:
    @hookimpl
    def register_model_families(self, register):
        def load(request):
            model = wrapped_load(request)
            return type("NoLogits", (), {k: getattr(model, k) for k in Wrapped.__slots__ if k != "_inner"})()

        register(ModelFamily(name="forgetful", architectures=("WrappedForCausalLM",), tasks=frozenset({"generate"}),
                             load=load))


@pytest.fixture(scope="module")
def wrapped_dir(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wrapped") / "model"
    shutil.copytree(tiny_llama, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["WrappedForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_generative_members_are_written_down():
    assert set(protocol_members(GenerativeModel)) == {
        "dtype", "device", "vocab_size", "max_position_embeddings", "sliding_window", "kv_layout", "num_parameters",
        "forward", "compute_logits"}


def test_a_family_written_from_the_contract_serves_like_the_builtin(tiny_llama, wrapped_dir):
    body = {"prompt": ["Once upon a time", "The river"], "max_tokens": 12, "temperature": 0, "logprobs": 2}
    chat = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10, "temperature": 0,
            "stream": True}
    with api_client(tiny_llama) as native:
        want = native.post("/v1/completions", json=body).json()
        want_chat = native.post("/v1/chat/completions", json=chat).text
    with api_client(wrapped_dir, plugins=("completions", "chat", "models"),
                    extra_plugins=[("wrapped", WrappedFamily())]) as c:
        assert isinstance(c.model.engine.runner.model, Wrapped)
        got = c.post("/v1/completions", json=body).json()
        got_chat = c.post("/v1/chat/completions", json=chat).text
    assert [ch["text"] for ch in got["choices"]] == [ch["text"] for ch in want["choices"]]
    assert [ch["logprobs"] for ch in got["choices"]] == [ch["logprobs"] for ch in want["choices"]]
    assert got["usage"] == want["usage"]

    def streamed(sse: str) -> tuple[str, str]:
        """The streamed text and finish reason (how deltas are cut into chunks depends on timing)."""
        chunks = [json.loads(x[6:]) for x in sse.splitlines() if x.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        return text, chunks[-1]["choices"][0]["finish_reason"]

    assert streamed(got_chat) == streamed(want_chat)


def test_a_family_that_forgets_a_member_stops_startup_naming_it(wrapped_dir):
    with pytest.raises(StartupError, match=r"model family 'forgetful'.*as a GenerativeModel it lacks forward, compute_logits"):
        with api_client(wrapped_dir, plugins=("models",), extra_plugins=[("forgetful", Forgetful())]):
            pass


# --------------------------------------------------------------------------- guard tests over the source


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "plugins" / "endpoints").glob("*.py")), ids=lambda p: p.name)
def test_endpoints_import_no_tensor_library(path):
    bad = {m for m in _imports(path) if m.split(".")[0] in ("torch", "numpy")}
    assert not bad, f"{path.name} imports {sorted(bad)}: tensor math belongs to the model or the runner"


@pytest.mark.parametrize("path", sorted((ROOT / "framework").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_kernel_imports_no_plugin(path):
    bad = {m for m in _imports(path) if m.split(".")[0] == "patchbay_plugins"}
    assert not bad, f"{path} imports {sorted(bad)}: the kernel knows no plugin"


@pytest.mark.parametrize("path", sorted((ROOT / "plugins" / "endpoints").glob("*.py")), ids=lambda p: p.name)
def test_endpoints_do_not_reach_into_the_engine(path):
    text = path.read_text()
    for needle in (".scheduler", ".runner", "hf_config", ".loaded"):
        assert needle not in text, f"{path.name} uses {needle}: endpoints only use ServedModel"


def test_no_source_file_is_over_500_lines():
    big = [(str(p.relative_to(ROOT)), n) for p in [*ROOT.glob("framework/**/*.py"), *ROOT.glob("plugins/**/*.py"),
                                                   *ROOT.glob("patchbay_kernels/*.py")]
           if (n := len(p.read_text().splitlines())) > 500]
    assert not big, f"split these along their seams: {big}"


def test_every_post_route_declares_its_body_type(tiny_llama):
    """``opt={"body": RequestType}`` on every POST route: the attrs type(s) its JSON body structures into
    (what an OpenAPI document is generated from)."""
    import typing

    import attrs

    from patchbay.plugins import load_plugins

    routes = load_plugins().build_registries().routes
    posts = [(plugin, h) for plugin, h in routes if "POST" in getattr(h, "http_methods", ())]
    assert posts
    for plugin, handler in posts:
        body = handler.opt.get("body")
        members = typing.get_args(body) or (body,)
        assert body is not None and all(attrs.has(m) for m in members), f"{plugin}: {handler.paths} declares no body"
