"""A response's output items and the stream events that build them, from a turn's pieces.

:class:`OutputBuilder` turns :class:`~patchbay_plugins.endpoints.toolstream.Piece` s into output items —
``reasoning``, ``message`` (one ``output_text`` part), ``function_call`` — and the events the ``openai``
client expects for each: ``response.output_item.added``, ``response.content_part.added``, text / reasoning
/ argument deltas, their ``.done`` events, ``response.output_item.done``. Streamed or not, the same builder
makes the output, so both agree item for item. Not a plugin itself.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

from patchbay_plugins.endpoints.toolstream import Piece

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputBuilder:
    """Collects one turn's output items; ``emit(event)`` receives each event (without its sequence number)."""

    def __init__(self, emit: Callable[[Event], None]):
        self.emit = emit
        self.items: list[dict[str, Any]] = []
        #: the item being written (its index is the last), and its text so far
        self._open: dict[str, Any] | None = None
        self._text = ""
        #: the message's token log-probabilities (when asked for)
        self._logprobs: list[dict[str, Any]] = []
        #: those of steps whose text is still held back (a partial character, a half-written marker)
        self._held: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ feeding

    def add(self, pieces: list[Piece], logprobs: list[dict[str, Any]] | None = None) -> None:
        """Pieces of one step, and (when asked for) that step's token log-probabilities. A step whose text is
        held back keeps its log-probabilities for the step that releases the text."""
        if logprobs is not None:
            logprobs, self._held = self._held + logprobs, []
            if not pieces:
                self._held = logprobs
                return
        for piece in pieces:
            if piece.kind == "reasoning":
                self._write("reasoning", piece.text)
            elif piece.kind == "content":
                self._write("message", piece.text, logprobs)
                logprobs = None
            elif piece.kind == "call":
                self._close("completed")
                self._start({"id": new_id("fc"), "type": "function_call", "call_id": piece.id, "name": piece.name,
                             "arguments": "", "status": "in_progress"})
            else:
                self._text += piece.text
                self.emit({"type": "response.function_call_arguments.delta", **self._where(), "delta": piece.text})

    def finish(self, status: str, complete_calls: set[str] = frozenset()) -> list[dict[str, Any]]:
        """Close what is open (``status``: ``completed``, or ``incomplete`` when the output was cut off — but a
        call in ``complete_calls``, by call id, was finished); a turn with no item at all gets an empty message,
        as OpenAI's do. Returns the output items."""
        held, self._held = self._held, []
        if held and (self._open is None or self._open["type"] == "message"):
            self._write("message", "", held)  # tokens whose text never came out (a partial character at the end)
        if not self.items:
            self._start(self._message())
        if self._open is not None and self._open.get("call_id") in complete_calls:
            status = "completed"
        self._close(status)
        return self.items

    # ------------------------------------------------------------------ items

    @staticmethod
    def _message() -> dict[str, Any]:
        return {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _start(self, item: dict[str, Any]) -> None:
        self._open, self._text = item, ""
        self.items.append(item)
        self.emit({"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": dict(item)})
        part = self._part("")
        if part is not None:
            self.emit({"type": "response.content_part.added", **self._where(), "content_index": 0, "part": part})

    def _part(self, text: str) -> dict[str, Any] | None:
        kind = self._open["type"]
        if kind == "message":
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(self._logprobs)}
        if kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return None

    def _write(self, kind: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        if self._open is None or self._open["type"] != kind:
            self._close("completed")
            self._logprobs = []
            self._start(self._message() if kind == "message" else
                        {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                         "status": "in_progress"})
        self._text += text
        event = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        body = {"type": event, **self._where(), "content_index": 0, "delta": text}
        if kind == "message":
            body["logprobs"] = list(logprobs or [])
            self._logprobs += logprobs or []
        self.emit(body)

    def _close(self, status: str) -> None:
        item = self._open
        if item is None:
            return
        where = self._where()
        text = self._text
        if item["type"] == "function_call":
            item["arguments"] = text
            self.emit({"type": "response.function_call_arguments.done", **where, "name": item["name"],
                       "arguments": text})
        else:
            part = self._part(text)
            done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
            body = {"type": done, **where, "content_index": 0, "text": text}
            if item["type"] == "message":
                body["logprobs"] = list(self._logprobs)
            self.emit(body)
            self.emit({"type": "response.content_part.done", **where, "content_index": 0, "part": part})
            item["content"] = [part]
        item["status"] = status
        self.emit({"type": "response.output_item.done", "output_index": where["output_index"], "item": dict(item)})
        self._open, self._text = None, ""


def output_text(items: list[dict[str, Any]]) -> str:
    """The text of a response's message items (the SDK's ``output_text``)."""
    return "".join(part.get("text", "") for item in items if item["type"] == "message"
                   for part in item.get("content", ()) if part.get("type") == "output_text")
