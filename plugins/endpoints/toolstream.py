"""One choice's output read as a turn — reasoning, content, tool calls — whole or streamed.

A :class:`TurnReader` is fed the choice's text as it is generated. After every piece it asks the reasoning
parser and the tool-call parser (:mod:`patchbay.tools`) to read the whole text so far, and returns what is
new since the previous reading as :class:`Piece` s: reasoning text, content text, a call opening (its id
and name), a call's arguments growing. :meth:`TurnReader.finish` reads the finished text and returns the
last pieces; :attr:`TurnReader.turn` is then the whole turn. So the streamed pieces concatenate to exactly
the non-streamed turn (for output the parsers read consistently, which every well-formed output is).

Shared by the chat and responses endpoints; not a plugin itself.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from patchbay.tools import ParsedCall


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@attrs.frozen
class Piece:
    """What is new in a turn: ``kind`` is ``reasoning`` / ``content`` (``text``), ``call`` (``index``, ``id``,
    ``name``: a call opens) or ``arguments`` (``index``, ``text``: more of its arguments)."""

    kind: str
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


@attrs.define
class Call:
    id: str
    name: str
    arguments: str = ""


@attrs.define
class Turn:
    """A finished turn: ``reasoning`` is None when there is none, ``content`` when there is none beside calls
    or reasoning."""

    reasoning: str | None = None
    content: str | None = None
    calls: list[Call] = attrs.Factory(list)


class TurnReader:
    """Reads one choice (see the module docstring). ``plan``: the request's
    :class:`~patchbay_plugins.endpoints.tooling.ToolPlan` (None: no tools)."""

    def __init__(self, reasoning_parser: Any, plan: Any):
        self.reasoning_parser = reasoning_parser
        self.reader = plan.reader if plan is not None else None
        self.max_calls = plan.max_calls if plan is not None else None
        self.text = ""
        self._reasoning = ""
        self._content = ""
        self._calls: list[Call] = []
        self._final: tuple[str | None, str, list[ParsedCall]] = (None, "", [])

    # ------------------------------------------------------------------ reading

    def _read(self, final: bool) -> tuple[str | None, str, list[ParsedCall]]:
        reasoning, rest, closed = None, self.text, True
        if self.reasoning_parser is not None:
            split = self.reasoning_parser.split(self.text, final)
            reasoning, rest, closed = split.reasoning, split.content, split.closed
        if self.reader is None or not (closed or final):
            return reasoning, rest, []
        parsed = self.reader.parse(rest, final)
        calls = list(parsed.calls)
        if self.max_calls is not None:
            calls = calls[: self.max_calls]
        content = parsed.content
        if calls or not final:
            content = content.rstrip()  # whitespace before a call is not content; held until more comes
        return reasoning, content, calls

    def feed(self, text: str) -> list[Piece]:
        """Pieces new after ``text`` was added."""
        self.text += text
        return self._diff(*self._read(False))

    def finish(self) -> list[Piece]:
        """The last pieces, from the finished text."""
        reasoning, content, calls = self._read(True)
        pieces = self._diff(reasoning, content, [c for c in calls if c.complete])
        self._final = (reasoning, content, calls)
        return pieces

    def _diff(self, reasoning: str | None, content: str, calls: list[ParsedCall]) -> list[Piece]:
        out = []
        if reasoning is not None:
            self._reasoning, piece = _grown(self._reasoning, reasoning)
            if piece:
                out.append(Piece("reasoning", piece))
        self._content, piece = _grown(self._content, content)
        if piece:
            out.append(Piece("content", piece))
        for i, call in enumerate(calls):
            if i == len(self._calls):
                if call.name is None:
                    break  # calls open in order, each once its name is known
                self._calls.append(Call(call_id(), call.name))
                out.append(Piece("call", index=i, id=self._calls[i].id, name=call.name))
            sent = self._calls[i]
            sent.arguments, piece = _grown(sent.arguments, call.arguments)
            if piece:
                out.append(Piece("arguments", piece, index=i))
        return out

    # ------------------------------------------------------------------ the whole turn

    @property
    def turn(self) -> Turn:
        """The finished turn (after :meth:`finish`): what the streamed pieces added up to, for a well-formed
        output; for a malformed one, the final reading."""
        reasoning, content, calls = self._final
        by_index = {i: c for i, c in enumerate(self._calls)}
        out = []
        for i, call in enumerate(c for c in calls if c.complete):
            known = by_index.get(i)
            out.append(Call(known.id if known is not None and known.name == call.name else call_id(), call.name,
                            call.arguments))
        empty = not content and (out or reasoning is not None)
        return Turn(reasoning=reasoning or None, content=None if empty else content, calls=out)


def _grown(sent: str, now: str) -> tuple[str, str]:
    """``(what has been sent, what is new)`` when ``now`` extends ``sent`` (else nothing new)."""
    if len(now) > len(sent) and now.startswith(sent):
        return now, now[len(sent):]
    return sent, ""


def reasoning_tokens(parser: Any, text: str, offsets: list[int]) -> int:
    """How many output tokens belong to the reasoning section (its end marker included): ``offsets[k]`` is
    where token ``k``'s text starts in ``text``. 0 without a reasoning parser or reasoning."""
    if parser is None or not offsets:
        return 0
    whole = parser.split(text, True)
    if whole.reasoning is None:
        return 0
    if not whole.closed:
        return len(offsets)
    ends = [*offsets[1:], len(text)]  # where each token's text ends
    lo, hi = 0, len(ends) - 1  # the first token after which the section is closed
    while lo < hi:
        mid = (lo + hi) // 2
        if parser.split(text[: ends[mid]], False).closed:
            hi = mid
        else:
            lo = mid + 1
    return lo + 1
