"""Log-probabilities in OpenAI's shapes (completions and chat) and vLLM's prompt_logprobs shape."""

from __future__ import annotations

from typing import Any, Sequence

from patchbay.engine.params import TokenLogprob
from patchbay.served import ServedModel


class TokenText:
    """Token id -> display string and bytes, per request (``return_tokens_as_token_ids``)."""

    def __init__(self, model: ServedModel, as_ids: bool):
        self.model = model
        self.as_ids = as_ids

    def raw(self, token: int) -> bytes:
        data = self.model.tokenizer_info.token_bytes
        b = data[token] if 0 <= token < len(data) else None
        if b is None:  # special tokens: their surface form
            piece = self.model.tokenizer.convert_ids_to_tokens(token)
            return (piece or "").encode()
        return b

    def text(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        return self.raw(token).decode("utf-8", errors="replace")

    def bytes(self, token: int) -> list[int]:
        return list(self.raw(token))


def _top_dict(tt: TokenText, entry: TokenLogprob) -> dict[str, float]:
    top = {tt.text(entry.token_id): entry.logprob}
    for token, lp in entry.top:
        top.setdefault(tt.text(token), lp)
    return top


def completion_logprobs(
    tt: TokenText,
    entries: Sequence[TokenLogprob],
    *,
    start: int = 0,
    prompt: Sequence[TokenLogprob | None] | None = None,
    prompt_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; echoed prompt tokens first.

    ``text_offset`` is one running count over the same strings as ``tokens`` (as vLLM counts it), from
    ``start`` (where the previous chunk of a stream left off).
    """
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if prompt is not None:
        for token, entry in zip(prompt_ids, prompt):
            tokens.append(tt.text(token))
            token_lps.append(None if entry is None else entry.logprob)
            tops.append(None if entry is None else _top_dict(tt, entry))
    for entry in entries:
        tokens.append(tt.text(entry.token_id))
        token_lps.append(entry.logprob)
        tops.append(_top_dict(tt, entry))
    text_offset = []
    for token in tokens:
        text_offset.append(start)
        start += len(token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": text_offset}


def next_offset(logprobs: dict[str, Any], start: int) -> int:
    """Where the running ``text_offset`` count goes on after ``logprobs`` (for the next stream chunk)."""
    return start + sum(len(t) for t in logprobs["tokens"])


def chat_logprobs(tt: TokenText, entries: Sequence[TokenLogprob], k: int) -> dict[str, Any]:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``."""
    content = []
    for entry in entries:
        top = [{"token": tt.text(t), "logprob": lp, "bytes": tt.bytes(t)} for t, lp in entry.top[:k]]
        content.append({"token": tt.text(entry.token_id), "logprob": entry.logprob,
                        "bytes": tt.bytes(entry.token_id), "top_logprobs": top})
    return {"content": content, "refusal": None}


def prompt_logprobs_json(tt: TokenText, entries: Sequence[TokenLogprob | None] | None,
                         prompt_ids: Sequence[int]) -> list[Any] | None:
    """vLLM's shape: ``[None, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...]``."""
    if entries is None:
        return None
    out: list[Any] = []
    for token, entry in zip(prompt_ids, entries):
        if entry is None:
            out.append(None)
            continue
        item = {str(token): {"logprob": entry.logprob, "rank": entry.rank, "decoded_token": tt.text(token)}}
        for rank, (t, lp) in enumerate(entry.top, 1):
            item.setdefault(str(t), {"logprob": lp, "rank": rank, "decoded_token": tt.text(t)})
        out.append(item)
    return out
