"""Chat templates: the tokenizer's own or ``--chat-template`` (file or inline), rendered in a Jinja sandbox,
under a budget, in a render thread (:func:`off_loop`) rather than on the event loop."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

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


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' ``tojson`` (no HTML escaping; indent, separators and key order as asked)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


#: a render's time and output budgets (``--chat-template-render-timeout`` / ``--chat-template-max-output``)
RENDER_SECONDS = 2.0
RENDER_MAX_CHARS = 8 * 1024 * 1024
#: loop iterations / calls between two clock readings
_CHECK_EVERY = 256
#: the longest template a request may bring (``chat_template``): compiling Jinja cannot be interrupted, and
#: takes ~1 s for 64 KiB of dense tags here (real chat templates are a few KiB, the largest ~30 KiB)
MAX_REQUEST_TEMPLATE_CHARS = 64 * 1024
#: render threads: a render ends itself within its budget, so a few threads serve every request in turn
RENDER_THREADS = 4
_render_pool: ThreadPoolExecutor | None = None
_render_pool_lock = threading.Lock()


async def off_loop(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a render thread: a template (compiling it, rendering it) never holds the event loop,
    and a runaway one holds a thread only until its budget stops it."""
    global _render_pool
    with _render_pool_lock:
        if _render_pool is None:
            _render_pool = ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="patchbay-render")
    return await asyncio.get_running_loop().run_in_executor(_render_pool, fn, *args)


class RenderBudgetError(TemplateError):
    pass


class _Budget:
    """One render's deadline and output allowance; ticked by every loop iteration and call in the template."""

    __slots__ = ("deadline", "max_chars", "ticks", "seconds")

    def __init__(self, seconds: float, max_chars: int):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.max_chars = max_chars
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks % _CHECK_EVERY == 0 and time.monotonic() > self.deadline:
            raise RenderBudgetError(f"rendering took longer than {self.seconds:g} s")

    def size(self, n: int) -> None:
        if n > self.max_chars:
            raise RenderBudgetError(f"the rendered prompt would exceed {self.max_chars} characters")


_budget: threading.local = threading.local()


def _current() -> _Budget | None:
    return getattr(_budget, "value", None)


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus a budget: every ``for`` loop's iterations and every call tick it, ``*`` and ``**``
    may not build values past the output allowance, and templates load no other template (include,
    import, extends: there is no loader, and such tags are refused at compile)."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        budget = _current()
        if budget is not None:
            budget.tick()
            _check_args(budget, args, kwargs)
            if getattr(__obj, "__name__", None) in ("format", "format_map") and isinstance(
                    getattr(__obj, "__self__", None), str):
                _check_format(budget, __obj.__self__)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        budget = _current()
        if budget is not None:
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                        budget.size(len(seq) * max(times, 0))
            elif operator == "%":
                if isinstance(left, str):
                    _check_format(budget, left)
            elif isinstance(left, int) and isinstance(right, int) and right > 0 and \
                    abs(left).bit_length() * right > 64 * 1024:
                raise RenderBudgetError("a power too large for the render budget")
        return super().call_binop(context, operator, left, right)

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
            tag = type(node).__name__.lower().replace("fromimport", "from ... import")
            raise jinja2.TemplateSyntaxError(f"{{% {tag} %}} is not allowed: a chat template is one self-contained "
                                             "template", node.lineno, name, filename)
        for loop in tree.find_all(nodes.For):  # every iteration ticks the budget
            loop.iter = nodes.Call(nodes.Name("__budget_iter", "load"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        return _ConcatBudget().visit(tree)


class _ConcatBudget(NodeTransformer):
    """``a ~ b`` through :func:`_budget_concat` (a doubling string would exhaust memory between ticks)."""

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802 - jinja's visitor naming
        self.generic_visit(node)
        return nodes.Call(nodes.Name("__budget_concat", "load"), [nodes.List(node.nodes)], [], None, None,
                          lineno=node.lineno)


def _budget_concat(values: list) -> str:
    text = "".join(str(v) for v in values)
    budget = _current()
    if budget is not None:
        budget.tick()
        budget.size(len(text))
    return text


_NUMBER = re.compile(r"\d{7,}")


def _check_format(budget: _Budget, spec: str) -> None:
    """A %- or {}-format whose width or precision alone would pass the output allowance."""
    for m in _NUMBER.finditer(spec):
        budget.size(int(m.group()))


def _check_args(budget: _Budget, args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > budget.max_chars:
            raise RenderBudgetError(f"a call with the number {value} exceeds the render budget")


def _budgeted_filter(fn):
    """A filter that ticks the budget and refuses numbers past the output allowance (``center(10**10)``)."""

    def run(*args, **kwargs):
        budget = _current()
        if budget is not None:
            budget.tick()
            _check_args(budget, args, kwargs)
        return fn(*args, **kwargs)

    run.jinja_pass_arg = getattr(fn, "jinja_pass_arg", None)  # context / environment first, as the filter wants
    if run.jinja_pass_arg is None:
        del run.jinja_pass_arg
    return run


def _budget_iter(iterable):
    budget = _current()
    if budget is None:
        yield from iterable
        return
    for item in iterable:
        budget.tick()
        yield item


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["__budget_iter"] = _budget_iter
    env.globals["__budget_concat"] = _budget_concat
    for name in list(env.filters):
        env.filters[name] = _budgeted_filter(env.filters[name])
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
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        if isinstance(it, nodes.Call) and isinstance(it.node, nodes.Name) and it.node.name == "__budget_iter":
            it = it.args[0]  # the budget's wrapper (see _BudgetedEnvironment._parse)
        if isinstance(it, nodes.Filter):
            it = it.node
        if isinstance(it, nodes.Getattr) and it.attr == "content":
            return "openai"
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const) and it.arg.value == "content":
            return "openai"
    return "string"


class ChatTemplate:
    def __init__(self, source: str | None, tokenizer: Any, *, seconds: float = RENDER_SECONDS,
                 max_chars: int = RENDER_MAX_CHARS):
        self.source = source
        self.seconds, self.max_chars = seconds, max_chars
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
        budget = _Budget(self.seconds, self.max_chars)
        _budget.value = budget
        out: list[str] = []
        size = 0
        try:
            for piece in self._compiled.generate(context):
                size += len(piece)
                budget.size(size)
                out.append(piece)
            return "".join(out)
        except RenderBudgetError as exc:
            raise bad_request(f"The chat template exceeded its render budget: {exc}.", param="messages",
                              code="chat_template_budget") from None
        except TemplateError as exc:
            raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
        except jinja2.TemplateError as exc:
            raise bad_request(f"The chat template failed to render: {exc}", param="messages") from None
        except (RecursionError, MemoryError, OverflowError, ArithmeticError, TypeError, ValueError, LookupError,
                AttributeError) as exc:  # the template's own error (range too big, a bad filter argument...)
            raise bad_request(f"The chat template failed to render: {type(exc).__name__}: {exc}",
                              param="messages") from None
        finally:
            _budget.value = None
