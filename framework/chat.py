"""Chat templates: the tokenizer's own or ``--chat-template`` (file or inline), rendered in a Jinja sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from patchbay.errors import APIError, bad_request

NO_TEMPLATE_HELP = (
    "This model has no chat template, so chat requests cannot be formatted. "
    "Start the server with --chat-template PATH_OR_STRING (a Jinja template file or the template itself), "
    "or use /v1/completions with a plain prompt."
)


class TemplateError(Exception):
    pass


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def resolve_template_source(flag: str | None, tokenizer: Any, model_dir: Path | None = None) -> str | None:
    """``--chat-template`` as a file path or an inline template, else the tokenizer's own, else the processor's
    ``chat_template.json`` in ``model_dir`` (older vision-language folders keep their template only there)."""
    if flag:
        path = Path(flag).expanduser()
        try:
            if path.is_file():
                return path.read_text()
        except OSError:
            pass
        if any(marker in flag for marker in ("{{", "{%")):
            return flag
        raise ValueError(f"--chat-template: {flag!r} is neither a readable file nor a Jinja template")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: use "default"
        template = template.get("default") or next(iter(template.values()), None)
    if not template and model_dir is not None and (Path(model_dir) / "chat_template.json").is_file():
        try:
            template = json.loads((Path(model_dir) / "chat_template.json").read_text()).get("chat_template")
        except (ValueError, AttributeError):
            template = None
    return template or None


def detect_content_format(source: str | None) -> str:
    """``openai`` when the template loops over a message's ``content`` (a list of parts), else ``string``."""
    if not source:
        return "string"
    try:
        ast = _environment().parse(source)
    except jinja2.TemplateSyntaxError:
        return "string"
    from jinja2 import nodes

    for loop in ast.find_all(nodes.For):
        it = loop.iter
        if isinstance(it, nodes.Filter):
            it = it.node
        if isinstance(it, nodes.Getattr) and it.attr == "content":
            return "openai"
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const) and it.arg.value == "content":
            return "openai"
    return "string"


class ChatTemplate:
    def __init__(self, source: str | None, tokenizer: Any):
        self.source = source
        self.special = {
            "bos_token": getattr(tokenizer, "bos_token", None) or "",
            "eos_token": getattr(tokenizer, "eos_token", None) or "",
            "pad_token": getattr(tokenizer, "pad_token", None) or "",
            "unk_token": getattr(tokenizer, "unk_token", None) or "",
        }
        self._compiled = None
        self.content_format = detect_content_format(source)
        if source is not None:
            try:
                self._compiled = _environment().from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"--chat-template: the template does not compile: {exc}") from exc

    @property
    def available(self) -> bool:
        return self._compiled is not None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if self._compiled is None:
            raise APIError(NO_TEMPLATE_HELP, status=400, param="messages", code="chat_template_missing")
        context = {**self.special, **kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self._compiled.render(context)
        except TemplateError as exc:
            raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
        except jinja2.TemplateError as exc:
            raise bad_request(f"The chat template failed to render: {exc}", param="messages") from None
