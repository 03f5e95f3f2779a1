"""Pooled vectors on the wire: float lists, base64 float32, and the quantised embedding types.

The engine hands endpoints finished vectors (float32 CPU tensors); these
functions put them into the encodings APIs ask for, so endpoints need no
tensor library of their own.

- ``float``: a list of numbers; ``base64``: little-endian float32 bytes, base64
  (what the openai client decodes);
- ``int8`` / ``uint8``: each component scaled by 127 and rounded, clipped to
  [-128, 127] (``uint8``: the same plus 128, in [0, 255]);
- ``binary`` / ``ubinary``: one bit per component (1 when positive), packed
  eight to a byte, most significant bit first; ``ubinary`` bytes in [0, 255],
  ``binary`` ones shifted by -128 into [-128, 127] (as sentence-transformers'
  ``quantize_embeddings`` and Cohere pack them).
"""

from __future__ import annotations

import base64
from typing import Any, Sequence

#: every encoding :func:`encode` knows
ENCODINGS = ("float", "base64", "int8", "uint8", "binary", "ubinary")


def to_list(vec: Any) -> list[float]:
    """A vector (or a 0-d / 1-element score) as plain numbers."""
    return vec.tolist()


def to_base64(vec: Any) -> str:
    """Little-endian float32 bytes of one vector, base64."""
    import numpy as np

    return base64.b64encode(np.ascontiguousarray(vec.numpy(), dtype="<f4").tobytes()).decode("ascii")


def encode(vectors: Sequence[Any], kind: str) -> list[Any]:
    """Each vector of ``vectors`` in the encoding ``kind`` (one of :data:`ENCODINGS`)."""
    import numpy as np

    if kind == "float":
        return [to_list(v) for v in vectors]
    if kind == "base64":
        return [to_base64(v) for v in vectors]
    if not vectors:
        return []
    x = np.stack([v.numpy() for v in vectors])
    if kind in ("int8", "uint8"):
        q = np.clip(np.rint(x * 127.0), -128, 127).astype(np.int64)
        return (q + 128 if kind == "uint8" else q).tolist()
    if kind in ("binary", "ubinary"):
        bits = np.packbits(x > 0, axis=-1).astype(np.int64)
        return (bits - 128 if kind == "binary" else bits).tolist()
    raise ValueError(f"unknown vector encoding {kind!r}; known: {ENCODINGS}")
