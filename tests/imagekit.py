"""Test images (deterministic, in any format and mode) and a local HTTP server that serves them (loopback only)."""

from __future__ import annotations

import base64
import io
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


def image(width: int = 40, height: int = 48, seed: int = 0, mode: str = "RGB"):
    """A Pillow image with structure (gradients) and noise, the same for the same arguments."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (3 + seed) + y) % 256, (y * (5 + seed)) % 256, (x * y + 17 * seed) % 256], -1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype("uint8")
    img = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(((x + y) * 7 % 256).astype("uint8"), "L")
        img = img.copy()
        img.putalpha(alpha)
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def encode(img, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_url(width: int = 40, height: int = 48, seed: int = 0, mode: str = "RGB") -> str:
    return data_url(encode(image(width, height, seed, mode)))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with (almost) no data: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


class Routes:
    """What the local server answers: path -> (status, headers, body, delay seconds)."""

    def __init__(self):
        self.routes: dict[str, tuple[int, dict[str, str], bytes, float]] = {}
        self.hits: list[str] = []

    def add(self, path: str, body: bytes = b"", status: int = 200, headers: dict[str, str] | None = None,
            delay: float = 0.0) -> None:
        self.routes[path] = (status, headers or {"Content-Type": "image/png"}, body, delay)


@contextmanager
def http_server() -> Iterator[tuple[str, Routes]]:
    """``(base url, routes)`` of an HTTP server on 127.0.0.1 (a thread; stopped on exit)."""
    routes = Routes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            routes.hits.append(self.path)
            status, headers, body, delay = routes.routes.get(self.path, (404, {}, b"not found", 0.0))
            if delay:
                time.sleep(delay)
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()
