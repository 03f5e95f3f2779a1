"""``serve --config FILE.yaml``: flags from YAML as vLLM reads them, the ``models`` key, and every
mistake a file can hold (no model is loaded here)."""

from __future__ import annotations

import textwrap

import pytest

from patchbay.config import ConfigError, ServerConfig, config_from_args


def write(tmp_path, text: str, name: str = "serve.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def config(*argv: str) -> ServerConfig:
    return config_from_args(list(argv))[0]


def refused(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        config(*argv)
    return str(info.value)


# --------------------------------------------------------------------------- flags from a file


def test_a_file_without_models_is_exactly_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("PATCHBAY_API_KEY", raising=False)
    path = write(tmp_path, """
        model: /models/tiny
        served_model_name: [tiny, tiny-alias]      # underscores and dashes alike
        max-num-seqs: 8
        kv-cache-memory: 64MiB
        enable-prefix-caching: false               # false: the --no- form
        trust-request-chat-template: true          # true: the switch
        api-key: [k1, k2]                          # a repeatable flag: each item once
        structured-outputs-config: {backend: outlines, disable_any_whitespace: true}  # a mapping: JSON
        structured-outputs-compile-timeout: 2.5
        plugins: llama,chat,health
    """)
    line = config("/models/tiny", "--served-model-name", "tiny", "tiny-alias", "--max-num-seqs", "8",
                  "--kv-cache-memory", "64MiB", "--no-enable-prefix-caching", "--trust-request-chat-template",
                  "--api-key", "k1", "--api-key", "k2", "--structured-outputs-config",
                  '{"backend": "outlines", "disable_any_whitespace": true}',
                  "--structured-outputs-compile-timeout", "2.5", "--plugins", "llama,chat,health")
    got = config("--config", path)
    assert got == line
    assert got.enable_prefix_caching is False and got.trust_request_chat_template is True
    assert got.kv_cache_memory == 64 * 1024**2 and got.api_key == ("k1", "k2")
    assert got.structured_outputs_backend == "outlines" and got.structured_outputs_disable_any_whitespace


def test_a_plain_switch_takes_true_or_false(tmp_path):
    """--enable-auto-tool-choice has no --no- form: true gives the flag, false leaves it out."""
    on = write(tmp_path, """
        tool-call-parser: hermes
        enable-auto-tool-choice: true
    """)
    assert config("--config", on) == config("--tool-call-parser", "hermes", "--enable-auto-tool-choice")
    off = write(tmp_path, """
        enable-auto-tool-choice: false
    """)
    assert config("--config", off).enable_auto_tool_choice is False


def test_the_command_line_wins_wherever_it_stands(tmp_path):
    path = write(tmp_path, """
        model: /from/file
        max-num-seqs: 8
        port: 9000
        enable-prefix-caching: false
    """)
    for argv in (["--max-num-seqs", "3", "--config", path], ["--config", path, "--max-num-seqs", "3"]):
        got = config(*argv)
        assert got.max_num_seqs == 3 and got.port == 9000 and got.model == "/from/file"
    assert config("--config", path, "--enable-prefix-caching").enable_prefix_caching is True
    assert config("/from/cli", "--config", path).model == "/from/cli"  # MODEL on the command line


def test_file_values_are_checked_as_the_command_line_checks_them(tmp_path):
    cases = {
        "max-num-seqs: 0": "--max-num-seqs: must be at least 1",
        "dtype: float8": "invalid choice: 'float8'",
        "port: eighty": "invalid int value",
        "kv-cache-memory: lots": "not a size",
        "enable-prefix-caching: 1": "enable-prefix-caching: is a switch",
        "max-num-seqs: true": "max-num-seqs: is not a switch",
        "enable-auto-tool-choice: yes please": "enable-auto-tool-choice: is a switch",
        "dtype: [float32, bfloat16]": "dtype: takes one value",
        "no-enable-prefix-caching: true": "write enable-prefix-caching: false",
        "max-num-seq: 4": "unknown key 'max-num-seq'",  # no abbreviations in a file
        "list-plugins: true": "unknown key 'list-plugins'",
        "config: other.yaml": "unknown key 'config'",
        "tokenizer:": "tokenizer: has no value",
    }
    for i, (line, message) in enumerate(cases.items()):
        path = write(tmp_path, f"model: /m\n{line}\n", f"case{i}.yaml")
        error = refused("--config", path)
        assert message in error and path in error, (line, error)


def test_a_missing_or_malformed_file_is_named(tmp_path):
    assert "is not a file" in refused("--config", str(tmp_path / "nope.yaml"))
    assert "not valid YAML" in refused("--config", write(tmp_path, "model: [unclosed\n"))
    assert "must be a mapping" in refused("--config", write(tmp_path, "- a\n- b\n", "list.yaml"))


# --------------------------------------------------------------------------- several models

MODELS = """
    host: 127.0.0.1
    port: 8123
    api-key: secret
    max-num-seqs: 8
    dtype: bfloat16
    enable-request-id-headers: true
    models:
      - model: /models/chat
        served-model-name: [chat, assistant]
        max-num-seqs: 4
        response-role: bot
      - model: /models/chat
        served-model-name: chat-embed
        convert: embed
        enable-prefix-caching: false
      - model: /models/encoder
"""


def test_each_model_takes_its_entry_then_the_top_level_then_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("PATCHBAY_API_KEY", raising=False)
    top = config("--config", write(tmp_path, MODELS))
    chat, embed, enc = top.models
    assert top.model is None and top.port == 8123 and top.api_key == ("secret",)
    assert chat.served_names() == ("chat", "assistant") and chat.max_num_seqs == 4 and chat.response_role == "bot"
    assert embed.served_names() == ("chat-embed",) and embed.convert == "embed" and embed.max_num_seqs == 8
    assert embed.enable_prefix_caching is False and chat.enable_prefix_caching is True
    assert enc.served_names() == ("/models/encoder",)  # no name: the directory as given, as vLLM does
    assert enc.max_num_seqs == 8 and enc.response_role == ServerConfig().response_role
    for m in top.models:  # server-wide flags and the top level reach every model
        assert m.dtype == "bfloat16" and m.host == "127.0.0.1" and m.port == 8123 and m.api_key == ("secret",)
        assert m.enable_request_id_headers is True
    assert top.model_configs() == top.models and ServerConfig(model="/m").model_configs() == (ServerConfig(model="/m"),)


def test_the_command_line_wins_over_every_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBAY_API_KEY", "from-env")
    path = write(tmp_path, MODELS.replace("    api-key: secret\n", ""))
    top = config("--max-num-seqs", "2", "--config", path, "--port", "9001")
    assert [m.max_num_seqs for m in top.models] == [2, 2, 2]
    assert {m.port for m in top.models} == {9001} and top.port == 9001
    assert {m.api_key for m in top.models} == {("from-env",)} and top.api_key == ("from-env",)


def test_a_config_with_models_survives_the_trip_to_the_worker(tmp_path):
    top = config("--config", write(tmp_path, MODELS))
    assert ServerConfig.from_json(top.to_json()) == top


@pytest.mark.parametrize("text, message", [
    ("models:\n  - model: /a\n    port: 9000\n", "models[0].port: 'port' is server-wide"),
    ("models:\n  - model: /a\n  - model: /b\n    api-key: x\n    log-level: debug\n",
     "models[1].api-key: 'api-key', 'log-level' are server-wide"),
    ("models:\n  - model: /a\n    enable-offline-docs: true\n",
     "models[0].enable-offline-docs: 'enable-offline-docs' is server-wide"),
    ("models:\n  - model: /a\n  - served-model-name: b\n", "models[1]: has no 'model'"),
    ("models:\n  - model: /a\n    max-num-seqs: 0\n", "models[0] (/a): --max-num-seqs: must be at least 1"),
    ("models:\n  - model: /a\n    bogus: 1\n", "models[0].bogus: unknown key 'bogus'"),
    ("bogus: 1\nmodels:\n  - model: /a\n", "bogus: unknown key 'bogus'"),
    ("models:\n  - model: /a\n    served-model-name: [x, y]\n  - model: /b\n    served-model-name: [z, y]\n",
     "the served name 'y' is used by models[0] and models[1]"),
    ("models:\n  - model: /a\n  - model: /a\n", "the served name '/a' is used by models[0] and models[1]"),
    ("models:\n  - model: /a\n    served-model-name: [x, x]\n", "'x' is used twice in the same entry"),
    ("model: /a\nmodels:\n  - model: /b\n", "models: cannot stand together with a top-level 'model'"),
    ("served-model-name: x\nmodels:\n  - model: /b\n", "give each model its served-model-name in its own entry"),
    ("models: []\n", "models: must be a list of mappings"),
    ("models: /a\n", "models: must be a list of mappings"),
    ("models:\n  - /a\n", "models[0]: must be a mapping"),
    ("models:\n  - model: 7\n", "models[0].model: must be a model directory"),
])
def test_mistakes_in_models_are_named(tmp_path, text, message):
    error = refused("--config", write(tmp_path, text))
    assert message in error, error


def test_models_with_a_model_argument_or_command_line_names_are_refused(tmp_path):
    path = write(tmp_path, "models:\n  - model: /a\n  - model: /b\n")
    assert "cannot stand together with a MODEL argument" in refused("/c", "--config", path)
    assert "served-model-name in its own entry" in refused("--config", path, "--served-model-name", "x")


def test_every_switch_can_be_written_true_or_false_in_a_file():
    """A switch added as ``store_true`` could not be written ``key: true`` in a config file (nor turned off
    on the command line over a file's ``true``): every switch but the commands is ``--x`` / ``--no-x``."""
    import argparse

    from patchbay.config import build_parser
    from patchbay.configfile import _NOT_SETTINGS

    one_way = [a.option_strings[0] for a in build_parser()._actions
               if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction))
               and a.option_strings[0] not in _NOT_SETTINGS]
    assert one_way == []
