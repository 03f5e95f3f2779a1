"""Images a request points at: ``data:`` URLs, http(s) downloads, and ``file://`` under an allowed root.

Shared by every endpoint that takes images (chat, embeddings, Cohere embed, score, rerank); they
hand URLs to :class:`MediaFetcher` and get decoded, checked images back (:class:`ImageInput`), or a
400 naming the request field. What happens to the pixels next is the model family's business.

Limits (flags, :class:`MediaPolicy`): a time limit over the whole fetch (DNS, connect, redirects,
body), a size limit on the bytes, and a pixel limit checked from the image header before anything
is decoded (a 20000x20000 PNG "decompression bomb" is refused having read a few dozen bytes).

Server-side fetching is an SSRF risk, so the rules go beyond vLLM's default:

- only ``http`` and ``https``; ``data:`` needs base64 and an ``image/*`` type; ``file://`` only under
  ``--allowed-local-media-path`` (symlinks resolved before the check);
- with ``--allowed-media-domains``, only those hosts (vLLM's rule), and they may resolve anywhere;
- otherwise every address a host name resolves to must be globally routable: loopback, private,
  link-local, CGNAT, multicast, reserved, unspecified and the cloud metadata addresses are refused, also
  in their IPv6 forms (IPv4-mapped, IPv4-compatible, 6to4, NAT64);
- the check runs where the connection is made (a guarded network backend under httpcore): after
  DNS resolution, on every redirect hop, and the socket goes to the very address that was checked
  (no second lookup a DNS rebinding could answer differently). TLS still verifies the host name.

Tests inject ``resolver`` (host -> addresses) and the inner network backend, so the decision is
checked without sending traffic anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import os
import socket
import ssl
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence
from urllib.parse import unquote, urljoin, urlsplit

import attrs

from patchbay.errors import bad_request

if TYPE_CHECKING:
    import httpcore
    from PIL import Image

#: image formats Pillow may decode (nothing exotic: every decoder is attack surface)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: ``data:`` URL media types accepted
DATA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
#: addresses of cloud instance-metadata services (AWS, GCP, Azure, Alibaba, ECS tasks, Oracle); most are
#: link-local anyway, but some are public or ULA addresses that a plain "is it private" check lets through
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.169.253", "100.100.100.200", "168.63.129.16", "192.0.0.192",
    "fd00:ec2::254",
))
#: IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64's well-known prefix, IPv4-compatible
#: addresses): the embedded address is what the connection reaches, so it is checked too
_EMBEDDING_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))
#: NAT64's local-use prefix (RFC 8215): its translations reach a site's own IPv4 network
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024

#: ``async resolver(host, port) -> addresses`` (strings); the default asks the system resolver
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class MediaRefused(Exception):
    """A URL or address the SSRF rules refuse (raised where the connection would have been made)."""


@attrs.frozen
class MediaPolicy:
    """The fetch limits and SSRF rules (from the server's flags)."""

    #: ``file://`` URLs are served only from under this directory (None: never)
    allowed_local_media_path: str | None = None
    #: when given, only these hosts may be fetched from (and their addresses are not checked)
    allowed_media_domains: tuple[str, ...] = ()
    #: seconds one fetch may take, DNS, redirects and body included
    timeout: float = 5.0
    #: most bytes one image may have (downloaded, decoded from base64, or read from a file)
    max_bytes: int = 20 * 1024 * 1024
    #: most pixels (width x height) one image may have, checked from its header before decoding
    max_pixels: int = 32 * 1024 * 1024
    #: redirects followed at most (each hop is checked again)
    max_redirects: int = 5

    @classmethod
    def from_config(cls, config: Any) -> "MediaPolicy":
        return cls(allowed_local_media_path=config.allowed_local_media_path,
                   allowed_media_domains=tuple(d.lower().rstrip(".") for d in config.allowed_media_domains),
                   timeout=config.media_fetch_timeout, max_bytes=config.max_media_bytes,
                   max_pixels=config.max_image_pixels, max_redirects=config.max_media_redirects)


@attrs.frozen
class ImageInput:
    """One decoded image of a request (loaded, any Pillow mode) and the hash of its pixels."""

    image: Image.Image
    #: hex digest of mode, size and pixels: equal images are equal here whatever their encoding
    hash: str
    #: the request field it came from ("messages[0].content[1]")
    param: str


# --------------------------------------------------------------------------- address rules


def address_refusal(address: str) -> str | None:
    """Why the SSRF rules refuse connecting to ``address`` (None: it is globally routable)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return "a local-use NAT64 address"
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and int(ip) > 1 and any(ip in net for net in _EMBEDDING_IPV4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:  # an IPv6 form of an IPv4 address (mapped, 6to4, NAT64): judge that address
            why = address_refusal(str(embedded))
            return None if why is None else f"{why} (as {ip})"
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for attr, what in (("is_unspecified", "the unspecified address"), ("is_loopback", "a loopback address"),
                       ("is_link_local", "a link-local address"), ("is_private", "a private address"),
                       ("is_multicast", "a multicast address"), ("is_reserved", "a reserved address")):
        if getattr(ip, attr):
            return what
    if not ip.is_global:
        return "not a globally routable address"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


class AddressGuard:
    """Decides where a connection may go: the host by the domain list, then each address it resolves to."""

    def __init__(self, policy: MediaPolicy, resolver: Resolver | None = None):
        self.policy = policy
        self.resolver = resolver or system_resolver

    def check_host(self, host: str) -> None:
        """The domain rule (``--allowed-media-domains``), before anything is resolved."""
        allowed = self.policy.allowed_media_domains
        if allowed and host.lower().rstrip(".") not in allowed:
            raise MediaRefused(f"the host {host!r} is not in --allowed-media-domains")

    async def address(self, host: str, port: int) -> str:
        """The address to connect to for ``host``: resolved once, every answer checked."""
        host = host.strip("[]")
        self.check_host(host)
        addresses = [host] if _is_ip(host) else list(await self.resolver(host, port))
        if not addresses:
            raise MediaRefused(f"the host {host!r} does not resolve")
        if not self.policy.allowed_media_domains:
            for address in addresses:
                why = address_refusal(address)
                if why is not None:
                    shown = host if address == host else f"{host!r} resolves to {address}, which"
                    raise MediaRefused(f"{shown} is {why}; the server does not fetch from there (list the host in "
                                       "--allowed-media-domains to allow it)")
        return addresses[0]


def _guarded_backend(guard: AddressGuard, inner: Any) -> Any:
    """An httpcore network backend that connects only where ``guard`` allows, to the address it checked."""
    import httpcore

    class GuardedBackend(httpcore.AsyncNetworkBackend):
        async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            address = await guard.address(host, port)
            return await inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                           socket_options=socket_options)

        async def connect_unix_socket(self, path, timeout=None, socket_options=None):
            raise MediaRefused("unix sockets are never fetched from")

        async def sleep(self, seconds: float) -> None:
            await inner.sleep(seconds)

    return GuardedBackend()


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, policy: MediaPolicy, param: str) -> ImageInput:
    """Open, check and load an image (CPU work: run it off the event loop). The pixel limit is checked
    from the header, before decoding; corrupt, truncated or unknown data is a 400."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise bad_request(f"{param}: the image has more than --max-image-pixels ({policy.max_pixels}) pixels.",
                          param=param, code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise bad_request(f"{param}: the data is not an image in a supported format "
                          f"({', '.join(IMAGE_FORMATS)}): {exc}", param=param, code="invalid_image") from None
    width, height = image.size
    if width * height > policy.max_pixels:
        raise bad_request(f"{param}: the image is {width}x{height}, more than --max-image-pixels "
                          f"({policy.max_pixels}) pixels.", param=param, code="image_too_large")
    if width < 1 or height < 1:
        raise bad_request(f"{param}: the image is empty ({width}x{height}).", param=param, code="invalid_image")
    try:
        image.seek(0)  # animations: the first frame
        image.load()
    except Image.DecompressionBombError:
        raise bad_request(f"{param}: the image is too large to decode.", param=param, code="image_too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise bad_request(f"{param}: the image data is truncated or corrupt: {exc}", param=param,
                          code="invalid_image") from None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{width}x{height}:".encode())
    digest.update(image.tobytes())
    return ImageInput(image=image, hash=digest.hexdigest(), param=param)


def data_url_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL."""
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"{param}: a data URL needs a comma before its data.", param=param, code="invalid_image")
    fields = [f.strip().lower() for f in head.split(";")]
    if "base64" not in fields[1:]:
        raise bad_request(f"{param}: data URLs must be base64 encoded (data:image/png;base64,...).", param=param,
                          code="invalid_image")
    if fields[0] not in DATA_TYPES:
        raise bad_request(f"{param}: data URL media type {fields[0] or '(none)'!r} is not an image type this server "
                          f"takes ({', '.join(DATA_TYPES)}).", param=param, code="invalid_image")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > policy.max_bytes + 3:
        raise bad_request(f"{param}: the image is larger than --max-media-bytes ({policy.max_bytes}).", param=param,
                          code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data URL is not valid base64.", param=param, code="invalid_image") from None


# --------------------------------------------------------------------------- the fetcher


class MediaFetcher:
    """Turns image URLs into decoded images under :class:`MediaPolicy` (one per served model)."""

    def __init__(self, policy: MediaPolicy, *, resolver: Resolver | None = None, network_backend: Any = None):
        self.policy = policy
        self.guard = AddressGuard(policy, resolver)
        #: where checked connections are opened (default: httpcore's own); tests route it to loopback
        self.network_backend = network_backend
        self._ssl: ssl.SSLContext | None = None

    async def images(self, urls: Sequence[tuple[str, str]]) -> list[ImageInput]:
        """Each ``(param, url)``'s image, fetched concurrently; the first failure cancels the rest."""
        tasks = [asyncio.ensure_future(self.image(url, param)) for param, url in urls]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    async def image(self, url: str, param: str) -> ImageInput:
        if not isinstance(url, str) or not url:
            raise bad_request(f"{param}: an image URL is required.", param=param)
        data = await self.fetch(url, param)
        return await asyncio.to_thread(decode_image, data, self.policy, param)

    async def fetch(self, url: str, param: str) -> bytes:
        """The bytes ``url`` names (``data:``, ``http(s)://``, ``file://``), within the limits."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return data_url_bytes(url, self.policy, param)
        if scheme == "file":
            return await asyncio.to_thread(self._read_file, url, param)
        if scheme not in ("http", "https"):
            raise bad_request(f"{param}: unsupported URL scheme {scheme or '(none)'!r}; use https, http or a "
                              "data: URL.", param=param, code="invalid_image_url")
        try:
            async with asyncio.timeout(self.policy.timeout):
                return await self._download(url, param)
        except TimeoutError:
            raise bad_request(f"{param}: fetching the image took longer than --media-fetch-timeout "
                              f"({self.policy.timeout:g}s).", param=param, code="image_fetch_failed") from None
        except MediaRefused as exc:
            raise bad_request(f"{param}: refused to fetch {_shown(url)}: {exc}.", param=param,
                              code="image_url_refused") from None

    def _read_file(self, url: str, param: str) -> bytes:
        root = self.policy.allowed_local_media_path
        if root is None:
            raise bad_request(f"{param}: file:// URLs are refused; start the server with --allowed-local-media-path "
                              "to serve images from a directory.", param=param, code="image_url_refused")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise bad_request(f"{param}: file:// URLs must name a local path.", param=param,
                              code="image_url_refused")
        path = os.path.realpath(unquote(parts.path))
        base = os.path.realpath(root)
        if os.path.commonpath([path, base]) != base:
            raise bad_request(f"{param}: {unquote(parts.path)!r} is outside --allowed-local-media-path.",
                              param=param, code="image_url_refused")
        try:
            with open(path, "rb") as fh:
                data = fh.read(self.policy.max_bytes + 1)
        except OSError as exc:
            raise bad_request(f"{param}: cannot read {unquote(parts.path)!r}: {exc.strerror}.", param=param,
                              code="image_fetch_failed") from None
        if len(data) > self.policy.max_bytes:
            raise bad_request(f"{param}: the file is larger than --max-media-bytes ({self.policy.max_bytes}).",
                              param=param, code="image_too_large")
        return data

    def _pool(self) -> httpcore.AsyncConnectionPool:
        import httpcore

        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        inner = self.network_backend or httpcore.AnyIOBackend()
        return httpcore.AsyncConnectionPool(ssl_context=self._ssl, network_backend=_guarded_backend(self.guard, inner),
                                            retries=0, http2=False)

    async def _download(self, url: str, param: str) -> bytes:
        import httpcore

        limit = self.policy.max_bytes
        async with self._pool() as pool:
            for _ in range(self.policy.max_redirects + 1):
                parts = urlsplit(url)
                if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                    raise bad_request(f"{param}: {_shown(url)} is not an http(s) URL with a host.", param=param,
                                      code="invalid_image_url")
                self.guard.check_host(parts.hostname)
                headers = [(b"User-Agent", b"patchbay"), (b"Accept", b"image/*")]
                try:
                    async with pool.stream("GET", url, headers=headers) as resp:
                        if resp.status in _REDIRECTS:
                            location = _header(resp, b"location")
                            if location is None:
                                raise bad_request(f"{param}: {_shown(url)} redirected without a Location.",
                                                  param=param, code="image_fetch_failed")
                            url = urljoin(url, location)
                            continue
                        if resp.status != 200:
                            raise bad_request(f"{param}: fetching {_shown(url)} failed: HTTP {resp.status}.",
                                              param=param, code="image_fetch_failed")
                        declared = _header(resp, b"content-length")
                        if declared is not None and declared.isdigit() and int(declared) > limit:
                            raise _too_big(param, limit)
                        body = bytearray()
                        async for chunk in resp.aiter_stream():
                            body += chunk
                            if len(body) > limit:
                                raise _too_big(param, limit)
                        return bytes(body)
                except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
                        httpcore.UnsupportedProtocol, httpcore.LocalProtocolError, ssl.SSLError, OSError) as exc:
                    raise bad_request(f"{param}: fetching {_shown(url)} failed: {type(exc).__name__}"
                                      f"{': ' + str(exc) if str(exc) else ''}.", param=param,
                                      code="image_fetch_failed") from None
        raise bad_request(f"{param}: more than {self.policy.max_redirects} redirects.", param=param,
                          code="image_fetch_failed")


def _header(resp: Any, name: bytes) -> str | None:
    for key, value in resp.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _too_big(param: str, limit: int) -> Exception:
    return bad_request(f"{param}: the image is larger than --max-media-bytes ({limit}).", param=param,
                       code="image_too_large")


def _shown(url: str) -> str:
    """A URL as error messages show it (no query string, bounded)."""
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return shown if len(shown) <= 120 else shown[:117] + "..."


__all__ = ["AddressGuard", "DATA_TYPES", "IMAGE_FORMATS", "ImageInput", "METADATA_ADDRESSES", "MediaFetcher",
           "MediaPolicy", "MediaRefused", "Resolver", "address_refusal", "data_url_bytes", "decode_image",
           "system_resolver"]
