"""What a chat-template render costs on the happy path (every chat request renders once).

Three ways to render the same messages with the same template, alternating, medians of ``--repeats``:

- ``baseline``: the sandbox as it was before the render budget (a plain ``ImmutableSandboxedEnvironment``,
  ``Template.render``, on the calling thread) — what main did;
- ``budget``: :class:`patchbay.chat.ChatTemplate` (every loop iteration and call ticks the budget, output
  and ``~`` / ``*`` / ``%`` checked), on the calling thread;
- ``budget_off_loop``: the same, awaited from an event loop through :func:`patchbay.chat.off_loop` (the render
  thread every chat request now renders in): the budget plus the thread hop.

Templates: ChatML (the tiny models' own) and a Llama-3-style template with system / tools / tool-call
branches and ``tojson``; conversations of 2 and 32 messages.

    .venv/bin/python benchmarks/render_bench.py --repeats 5 --calls 2000 --out render.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import datetime
from typing import Any, Callable

from jinja2.sandbox import ImmutableSandboxedEnvironment

from patchbay.chat import ChatTemplate, TemplateError, _tojson, off_loop
from patchbay_plugins.tinymodels.tokenizers import DEFAULT_CHAT_TEMPLATE

LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{%- if tools is defined and tools %}
    {{- "You have access to the following functions:\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role in ['user', 'assistant', 'system'] and not message.tool_calls %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.tool_calls %}
        {%- for call in message.tool_calls %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
            {{- '{"name": "' + call.function.name + '", "parameters": ' }}
            {{- call.function.arguments | tojson }}
            {{- "}<|eot_id|>" }}
        {%- endfor %}
    {%- elif message.role == "tool" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

TEMPLATES = {"chatml": DEFAULT_CHAT_TEMPLATE, "llama3_style": LLAMA3_STYLE}


class _Tokens:
    bos_token, eos_token, pad_token, unk_token = "<s>", "</s>", "<pad>", "<unk>"


def conversation(turns: int) -> list[dict[str, Any]]:
    text = "Please summarise the following paragraph in two sentences, keeping every number exact. " * 2
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful assistant."}]
    for i in range(turns - 1):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}: {text}"})
    return messages


def baseline_render(source: str) -> Callable[[list[dict[str, Any]]], str]:
    """main's renderer: the sandbox without the budget."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(TemplateError(message))
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    template = env.from_string(source)
    special = {k: getattr(_Tokens, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return lambda messages: template.render({**special, "messages": messages, "add_generation_prompt": True})


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def off_loop_us(template: ChatTemplate, messages: list[dict[str, Any]], calls: int) -> float:
    async def main() -> float:
        await off_loop(template.render, messages)  # the render thread exists before timing
        start = time.perf_counter()
        for _ in range(calls):
            await off_loop(template.render, messages)
        return (time.perf_counter() - start) / calls * 1e6

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000, help="renders per timed run")
    ap.add_argument("--turns", type=int, nargs="+", default=[2, 32])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    rows = []
    for name, source in TEMPLATES.items():
        budgeted = ChatTemplate(source, _Tokens())
        plain = baseline_render(source)
        for turns in args.turns:
            messages = conversation(turns)
            assert plain(messages) == budgeted.render(messages), "the budget changed the output"
            runs: dict[str, list[float]] = {"baseline": [], "budget": [], "budget_off_loop": []}
            for _ in range(args.repeats):  # alternating, so drifting machine load hits each alike
                runs["baseline"].append(per_call_us(lambda: plain(messages), args.calls))
                runs["budget"].append(per_call_us(lambda: budgeted.render(messages), args.calls))
                runs["budget_off_loop"].append(off_loop_us(budgeted, messages, args.calls))
            med = {k: statistics.median(v) for k, v in runs.items()}
            row = {"template": name, "messages": turns, "prompt_chars": len(plain(messages)),
                   **{f"{k}_us": round(v, 1) for k, v in med.items()},
                   "budget_over_baseline": round(med["budget"] / med["baseline"], 3),
                   "off_loop_over_baseline": round(med["budget_off_loop"] / med["baseline"], 3)}
            rows.append(row)
    print("| template | messages | baseline µs | budget µs | budget off loop µs | budget / baseline "
          "| off loop / baseline |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['template']} | {r['messages']} | {r['baseline_us']} | {r['budget_us']} | "
              f"{r['budget_off_loop_us']} | {r['budget_over_baseline']} | {r['off_loop_over_baseline']} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"repeats": args.repeats, "calls": args.calls, "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
