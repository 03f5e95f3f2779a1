"""Build :class:`patchbay.decoding.TokenizerInfo` — the exact bytes every token id contributes.

Structured-output backends match constraints against bytes, so they need, for
every id the model can sample, the byte string that id appends to the output:

- byte-level BPE (GPT-2 / Llama 3 / Qwen style, ``ByteLevel`` decoder): each
  character of the vocabulary string stands for one byte (the GPT-2
  ``bytes_to_unicode`` table), so partial UTF-8 sequences come out exact;
- SentencePiece / ``Metaspace`` (Llama 2 / Mistral style): ``▁`` is a space,
  and with byte fallback ``<0xNN>`` is that one byte;
- added (non-special) tokens: their content, UTF-8 encoded, as ``decode``
  renders them;
- special tokens (and every EOS id) and ids the tokenizer does not have (up to
  the model's logits width ``vocab_size``): ``None``.

Anything else falls back to decoding each token after a reference token (slow
and lossy for partial UTF-8, but correct for whole characters).

Nothing is cached globally: the kernel builds one info per served tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable

from patchbay.decoding import TokenizerInfo

__all__ = ["build_tokenizer_info", "bytes_to_unicode"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _decoder_spec(hf_tokenizer: Any) -> tuple[str, str, bool]:
    """``(kind, metaspace_char, byte_fallback)``; kind is ``byte_level``, ``metaspace`` or ``generic``."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        # slow SentencePiece tokenizers keep their pieces with "▁" and "<0xNN>"
        if getattr(hf_tokenizer, "sp_model", None) is not None:
            return "metaspace", "▁", True
        return "generic", "", False
    try:
        dec = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    except Exception:  # noqa: BLE001 - unknown decoder object: use the generic path
        dec = {}
    model_fallback = bool(getattr(backend.model, "byte_fallback", False))
    parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    types = [p.get("type") for p in parts if isinstance(p, dict)]
    byte_fallback = model_fallback or "ByteFallback" in types
    if "ByteLevel" in types:
        return "byte_level", "", byte_fallback
    for p in parts:
        if p.get("type") == "Metaspace":
            return "metaspace", p.get("replacement", "▁"), byte_fallback
        if p.get("type") == "Replace" and p.get("content") == " ":
            pattern = p.get("pattern", {})
            if isinstance(pattern, dict) and isinstance(pattern.get("String"), str) and len(pattern["String"]) == 1:
                return "metaspace", pattern["String"], byte_fallback
    return "generic", "", byte_fallback


def _generic_bytes(hf_tokenizer: Any, ids: Iterable[int]) -> dict[int, bytes]:
    """Bytes of each id by decoding it after a reference token (keeps leading spaces)."""
    ref = hf_tokenizer.encode("a", add_special_tokens=False)[-1:]
    base = hf_tokenizer.decode(ref)
    out = {}
    for i in ids:
        text = hf_tokenizer.decode(ref + [i])
        text = text[len(base):] if text.startswith(base) else hf_tokenizer.decode([i])
        out[i] = text.encode("utf-8")
    return out


def build_tokenizer_info(hf_tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> TokenizerInfo:
    """The :class:`TokenizerInfo` of ``hf_tokenizer`` for a model whose logits are ``vocab_size`` wide."""
    vocab_size = int(vocab_size)
    eos = tuple(dict.fromkeys(int(e) for e in eos_token_ids))
    n = min(len(hf_tokenizer), vocab_size)

    special: set[int] = {int(i) for i in (getattr(hf_tokenizer, "all_special_ids", None) or []) if i is not None}
    added: dict[int, str] = {}
    for i, tok in (getattr(hf_tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            special.add(int(i))
        else:
            added[int(i)] = str(getattr(tok, "content", tok))
    special.update(eos)
    special = {i for i in special if 0 <= i < vocab_size}

    kind, meta, byte_fallback = _decoder_spec(hf_tokenizer)
    pieces = hf_tokenizer.convert_ids_to_tokens(list(range(n)))
    token_bytes: list[bytes | None] = [None] * vocab_size
    generic: list[int] = []

    piece_bytes: Any = None  # None: decode each piece (the generic path)
    if kind == "byte_level":
        table = {ord(c): chr(b) for b, c in bytes_to_unicode().items()}

        def piece_bytes(piece: str) -> bytes:
            try:
                return piece.translate(table).encode("latin-1")
            except UnicodeEncodeError:  # a character outside the byte table: not a byte-level piece
                return piece.encode("utf-8")
    elif kind == "metaspace":

        def piece_bytes(piece: str) -> bytes:
            m = _BYTE_FALLBACK.match(piece) if byte_fallback else None
            return bytes([int(m.group(1), 16)]) if m else piece.replace(meta, " ").encode("utf-8")

    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            continue
        if i in added:
            token_bytes[i] = added[i].encode("utf-8")
        elif piece_bytes is None:
            generic.append(i)
        else:
            token_bytes[i] = piece_bytes(piece)
    for i, b in _generic_bytes(hf_tokenizer, generic).items():
        token_bytes[i] = b

    h = hashlib.sha256()
    h.update(f"{vocab_size}|{eos}|".encode())
    for b in token_bytes:
        if b is None:
            h.update(b"\xff")
        else:
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
    return TokenizerInfo(
        vocab_size=vocab_size,
        token_bytes=token_bytes,
        eos_token_ids=eos,
        special_ids=frozenset(special),
        hf_tokenizer=hf_tokenizer,
        fingerprint=h.hexdigest()[:16],
    )
