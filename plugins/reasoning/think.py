"""Reasoning in ``<think>...</think>`` (plugin ``think``), under two names:

- ``deepseek_r1``: DeepSeek-R1 and its distills. Their chat template often writes ``<think>`` into the
  prompt, so everything before ``</think>`` is reasoning (a leading ``<think>`` dropped) and an output
  that never closes it is all reasoning;
- ``qwen3``: Qwen3, whose output opens with ``<think>`` when it thinks. An output that does not start
  with ``<think>`` is all content (Qwen3 with ``enable_thinking: false``); one that opens it and is cut
  off before ``</think>`` is all reasoning.

The content is what follows ``</think>``, leading whitespace dropped.
"""

from __future__ import annotations

from typing import Any

from patchbay import hookimpl
from patchbay.registry import ReasoningParserSpec
from patchbay.tools import ReasoningSplit

OPEN, CLOSE = "<think>", "</think>"


def _held(text: str, marker: str) -> int:
    """Characters at the end of ``text`` that may be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ThinkReasoningParser:
    #: an output need not open with <think> (the prompt did)
    open_optional = True

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def split(self, text: str, final: bool) -> ReasoningSplit:
        body = text.lstrip()
        if body.startswith(OPEN):
            body = body[len(OPEN):]
        elif not self.open_optional:
            if not final and OPEN.startswith(body):
                return ReasoningSplit(None, "", closed=False)  # "<thi" may be the tag
            return ReasoningSplit(None, text)
        elif not final and body and OPEN.startswith(body):
            return ReasoningSplit("", "", closed=False)
        end = body.find(CLOSE)
        if end < 0:
            held = 0 if final else _held(body, CLOSE)
            return ReasoningSplit(body[: len(body) - held], "", closed=False)
        return ReasoningSplit(body[:end], body[end + len(CLOSE):].lstrip(), closed=True)

    def reasoning_grammar(self) -> str | None:
        # deepseek_r1: the section is always there (the prompt may have opened it); qwen3: only if opened
        section = '"<think>"? thought REASONING_GAP' if self.open_optional else '("<think>" thought REASONING_GAP)?'
        return (f"reasoning: {section}\n"
                "thought[lazy]: /(.|\\n)*<\\/think>/\n"
                "REASONING_GAP: /[ \\t\\n]{0,2}/\n")


class Qwen3ReasoningParser(ThinkReasoningParser):
    open_optional = False


@hookimpl
def register_reasoning_parsers(register):
    register(ReasoningParserSpec("deepseek_r1", ThinkReasoningParser))
    register(ReasoningParserSpec("qwen3", Qwen3ReasoningParser))
