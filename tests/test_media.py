"""patchbay.media: data: URLs, downloads with time / size / pixel limits, file:// under a root, and the SSRF rules.

Traffic goes to loopback only: a local HTTP server (imagekit.http_server). Refusals of private, link-local and
metadata addresses are checked at the decision — names resolve through an injected resolver, and the inner
network backend records every connection it is asked to open (and must not be asked for refused ones).
"""

from __future__ import annotations

import asyncio
import os
import time

import httpcore
import pytest

import imagekit
from patchbay.errors import APIError
from patchbay.media import MediaFetcher, MediaPolicy, address_refusal


class Recording(httpcore.AsyncNetworkBackend):
    """An inner backend that records the (checked) addresses it is asked to connect to and connects to
    ``route`` (the local test server) instead, so "public" test names can be served from loopback."""

    def __init__(self, route: tuple[str, int] | None = None):
        self.route = route
        self.connects: list[tuple[str, int]] = []
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connects.append((host, port))
        if self.route is None:
            raise AssertionError(f"the guard let a connection to {host}:{port} through")
        return await self.inner.connect_tcp(*self.route, timeout=timeout)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise AssertionError("unix socket")

    async def sleep(self, seconds):
        await self.inner.sleep(seconds)


def names(**table: list[str]):
    """An injected resolver: test host names to the addresses given (no DNS traffic)."""

    async def resolve(host: str, port: int) -> list[str]:
        key = host.replace(".", "_").replace("-", "_")
        if key not in table:
            raise OSError(f"unknown test host {host}")
        return table[key]

    return resolve


def fetch(fetcher: MediaFetcher, url: str):
    return asyncio.run(fetcher.image(url, "messages[0].content[0]"))


def refused(fetcher: MediaFetcher, url: str, contains: str = "", code: str | None = None) -> APIError:
    with pytest.raises(APIError) as info:
        fetch(fetcher, url)
    err = info.value
    assert err.status == 400 and err.param == "messages[0].content[0]", err.body()
    assert contains in err.message, err.message
    if code is not None:
        assert err.code == code, err.body()
    return err


# --------------------------------------------------------------------------- data: URLs and decoding


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_data_urls_of_each_format_decode(fmt, mime):
    img = imagekit.image(30, 20, 1)
    got = fetch(MediaFetcher(MediaPolicy()), imagekit.data_url(imagekit.encode(img, fmt), mime))
    assert got.image.size == (30, 20)
    if fmt == "PNG":
        assert got.image.tobytes() == img.tobytes()


def test_equal_pixels_hash_equal_whatever_the_encoding():
    img = imagekit.image(24, 24, 3)
    fetcher = MediaFetcher(MediaPolicy())
    a = fetch(fetcher, imagekit.data_url(imagekit.encode(img, "PNG")))
    b = fetch(fetcher, imagekit.data_url(imagekit.encode(img, "WEBP", lossless=True), "image/webp"))
    c = fetch(fetcher, imagekit.data_url(imagekit.encode(imagekit.image(24, 24, 4), "PNG")))
    assert a.hash == b.hash != c.hash


@pytest.mark.parametrize("url,contains", [
    ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
    ("data:image/png,rawdata", "base64"),
    ("data:text/plain;base64,aGVsbG8=", "media type"),
    ("data:image/png;base64", "comma"),
    ("data:image/png;base64," + imagekit.data_url(b"GIF89a nonsense").split(",")[1], "not an image"),
])
def test_bad_data_urls_are_400s(url, contains):
    refused(MediaFetcher(MediaPolicy()), url, contains)


def test_truncated_png_is_a_400():
    data = imagekit.encode(imagekit.image(64, 64, 1))
    refused(MediaFetcher(MediaPolicy()), imagekit.data_url(data[: len(data) // 2]), "truncated or corrupt",
            code="invalid_image")


def test_decompression_bomb_is_refused_from_its_header():
    bomb = imagekit.bomb_png(20000, 20000)
    assert len(bomb) < 200  # the header claims 400M pixels; nothing like that is ever decoded
    start = time.monotonic()
    err = refused(MediaFetcher(MediaPolicy()), imagekit.data_url(bomb), "pixels", code="image_too_large")
    assert time.monotonic() - start < 1.0, "the bomb was decoded instead of refused from its header"
    assert "20000x20000" in err.message or "max-image-pixels" in err.message


def test_pixel_and_size_limits_are_the_flags():
    url = imagekit.png_url(40, 40, 1)
    refused(MediaFetcher(MediaPolicy(max_pixels=1599)), url, "1599", code="image_too_large")
    assert fetch(MediaFetcher(MediaPolicy(max_pixels=1600)), url).image.size == (40, 40)
    refused(MediaFetcher(MediaPolicy(max_bytes=100)), url, "--max-media-bytes", code="image_too_large")


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://x/", "javascript:alert(1)", "//no-scheme"])
def test_other_schemes_are_refused(url):
    refused(MediaFetcher(MediaPolicy()), url, "scheme")


# --------------------------------------------------------------------------- file://


def test_file_urls_only_under_the_allowed_root(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(imagekit.encode(imagekit.image(10, 12, 1)))
    (tmp_path / "secret.png").write_bytes(imagekit.encode(imagekit.image(10, 12, 2)))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    refused(MediaFetcher(MediaPolicy()), f"file://{root}/a.png", "--allowed-local-media-path")
    fetcher = MediaFetcher(MediaPolicy(allowed_local_media_path=str(root)))
    assert fetch(fetcher, f"file://{root}/a.png").image.size == (10, 12)
    refused(fetcher, f"file://{root}/../secret.png", "outside")
    refused(fetcher, f"file://{root}/link.png", "outside")  # the symlink resolves outside the root
    refused(fetcher, f"file://{root}/missing.png", "cannot read")
    refused(fetcher, f"file://otherhost{root}/a.png", "local path")


# --------------------------------------------------------------------------- downloads from loopback


def test_download_with_the_host_allowed():
    with imagekit.http_server() as (base, routes):
        routes.add("/a.png", imagekit.encode(imagekit.image(20, 10, 1)))
        routes.add("/moved", status=302, headers={"Location": "/a.png"})
        fetcher = MediaFetcher(MediaPolicy(allowed_media_domains=("127.0.0.1",)))
        assert fetch(fetcher, base + "/a.png").image.size == (20, 10)
        assert fetch(fetcher, base + "/moved").image.size == (20, 10)
        refused(fetcher, base + "/missing.png", "HTTP 404", code="image_fetch_failed")
        routes.add("/text", b"<html>hello</html>", headers={"Content-Type": "text/html"})
        refused(fetcher, base + "/text", "not an image")


def test_download_limits_time_and_size():
    with imagekit.http_server() as (base, routes):
        routes.add("/slow.png", imagekit.encode(imagekit.image(8, 8, 1)), delay=3.0)
        routes.add("/big.png", b"\0" * 5000)
        fetcher = MediaFetcher(MediaPolicy(allowed_media_domains=("127.0.0.1",), timeout=0.5, max_bytes=4000))
        start = time.monotonic()
        refused(fetcher, base + "/slow.png", "--media-fetch-timeout", code="image_fetch_failed")
        assert time.monotonic() - start < 2.0
        refused(fetcher, base + "/big.png", "--max-media-bytes", code="image_too_large")


def test_a_port_nobody_listens_on_is_a_400():
    fetcher = MediaFetcher(MediaPolicy(allowed_media_domains=("127.0.0.1",)))
    with imagekit.http_server() as (base, _):
        port = int(base.rsplit(":", 1)[1])
    refused(fetcher, f"http://127.0.0.1:{port}/gone.png", "failed", code="image_fetch_failed")


def test_redirect_loops_end():
    with imagekit.http_server() as (base, routes):
        routes.add("/loop", status=302, headers={"Location": "/loop"})
        refused(MediaFetcher(MediaPolicy(allowed_media_domains=("127.0.0.1",), max_redirects=3)), base + "/loop",
                "redirects")


# --------------------------------------------------------------------------- SSRF rules


@pytest.mark.parametrize("address,why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.10", "private"),
    ("172.16.5.4", "private"), ("169.254.169.254", "metadata"), ("169.254.10.10", "link-local"),
    ("fe80::1", "link-local"), ("fd00:ec2::254", "metadata"), ("100.100.100.200", "metadata"),
    ("100.64.0.1", "not a globally routable"), ("0.0.0.0", "unspecified"), ("::ffff:127.0.0.1", "loopback"),
    ("224.0.0.1", "multicast"), ("fc00::5", "private"), ("168.63.129.16", "metadata"),
    # IPv6 forms of IPv4 addresses reach the IPv4 address (Python calls the first three global)
    ("64:ff9b::a9fe:a9fe", "metadata"), ("64:ff9b::7f00:1", "loopback"), ("2002:a9fe:a9fe::1", "metadata"),
    ("2002:0a00:0001::1", "private"), ("::127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("64:ff9b:1::a00:1", "local-use NAT64"), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"),
])
def test_address_rules(address, why):
    assert why in (address_refusal(address) or ""), address_refusal(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808",
                                     "2002:5db8:d822::1"])
def test_public_addresses_pass(address):
    assert address_refusal(address) is None


def test_the_local_server_itself_is_refused_without_an_allowlist():
    with imagekit.http_server() as (base, routes):
        routes.add("/a.png", imagekit.encode(imagekit.image(8, 8, 1)))
        for host in ("127.0.0.1", "localhost"):
            refused(MediaFetcher(MediaPolicy()), base.replace("127.0.0.1", host) + "/a.png", "loopback",
                    code="image_url_refused")
        assert routes.hits == [], "a refused URL was fetched"


@pytest.mark.parametrize("url,contains", [
    ("http://internal.test/a.png", "private"),
    ("http://metadata.test/latest/meta-data/", "metadata"),
    ("http://linklocal.test/", "link-local"),
    ("http://mixed.test/a.png", "private"),  # one public and one private answer: refused
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]/latest/", "metadata"),
    ("http://10.0.0.1/a.png", "private"),
])
def test_private_link_local_and_metadata_hosts_are_refused_before_connecting(url, contains):
    backend = Recording()
    resolver = names(internal_test=["10.9.8.7"], metadata_test=["169.254.169.254"], linklocal_test=["169.254.3.3"],
                     mixed_test=["93.184.216.34", "192.168.1.1"])
    refused(MediaFetcher(MediaPolicy(), resolver=resolver, network_backend=backend), url, contains,
            code="image_url_refused")
    assert backend.connects == []


def test_the_allowlist_is_the_only_hosts_and_lets_them_be_private():
    backend = Recording()
    resolver = names(cdn_test=["10.0.0.5"], other_test=["93.184.216.34"])
    fetcher = MediaFetcher(MediaPolicy(allowed_media_domains=("cdn.test",)), resolver=resolver,
                           network_backend=backend)
    refused(fetcher, "http://other.test/a.png", "--allowed-media-domains")
    assert backend.connects == []
    with imagekit.http_server() as (base, routes):
        routes.add("/a.png", imagekit.encode(imagekit.image(8, 8, 1)))
        backend.route = ("127.0.0.1", int(base.rsplit(":", 1)[1]))
        assert fetch(fetcher, "http://cdn.test/a.png").image.size == (8, 8)
    assert backend.connects == [("10.0.0.5", 80)]  # the checked address is the one connected to


def test_every_redirect_is_checked_again():
    """A public host (resolved by the test resolver, served from loopback) redirects to the metadata service:
    refused at the redirect, before any connection there."""
    resolver = names(public_test=["93.184.216.34"], metadata_test=["169.254.169.254"])
    with imagekit.http_server() as (base, routes):
        port = int(base.rsplit(":", 1)[1])
        routes.add("/a.png", imagekit.encode(imagekit.image(8, 8, 1)))
        routes.add("/to-metadata", status=302, headers={"Location": "http://metadata.test/latest/meta-data/"})
        routes.add("/to-literal", status=301, headers={"Location": "http://169.254.169.254/latest/"})
        routes.add("/to-loopback", status=307, headers={"Location": f"http://127.0.0.1:{port}/a.png"})
        backend = Recording(("127.0.0.1", port))
        fetcher = MediaFetcher(MediaPolicy(), resolver=resolver, network_backend=backend)
        assert fetch(fetcher, "http://public.test/a.png").image.size == (8, 8)
        for path, why in (("/to-metadata", "metadata"), ("/to-literal", "metadata"), ("/to-loopback", "loopback")):
            backend.connects.clear()
            refused(fetcher, "http://public.test" + path, why, code="image_url_refused")
            assert backend.connects == [("93.184.216.34", 80)], backend.connects  # only the first hop
        assert routes.hits.count("/a.png") == 1


# --------------------------------------------------------------------------- the flags


def test_media_flags_parse_and_validate(tmp_path):
    from patchbay.config import ConfigError, ServerConfig, config_from_args

    config, _ = config_from_args([
        "--allowed-local-media-path", str(tmp_path), "--allowed-media-domains", "cdn.example.com", "IMG.example.com.",
        "--media-fetch-timeout", "2.5", "--max-media-bytes", "1MiB", "--max-image-pixels", "1000000",
        "--max-media-redirects", "0", "--limit-mm-per-prompt", '{"image": 3}', "--encoder-cache-tokens", "0"])
    assert ServerConfig.from_json(config.to_json()) == config
    policy = MediaPolicy.from_config(config)
    assert policy == MediaPolicy(allowed_local_media_path=str(tmp_path),
                                 allowed_media_domains=("cdn.example.com", "img.example.com"), timeout=2.5,
                                 max_bytes=1024 * 1024, max_pixels=1_000_000, max_redirects=0)
    assert config.limit_mm_per_prompt == {"image": 3} and config.encoder_cache_tokens == 0
    for argv, flag in ((["--limit-mm-per-prompt", "[1]"], "--limit-mm-per-prompt"),
                       (["--limit-mm-per-prompt", '{"smell": 1}'], "--limit-mm-per-prompt"),
                       (["--limit-mm-per-prompt", '{"image": -1}'], "--limit-mm-per-prompt"),
                       (["--media-fetch-timeout", "0"], "--media-fetch-timeout"),
                       (["--max-image-pixels", "0"], "--max-image-pixels"),
                       (["--max-media-redirects", "-1"], "--max-media-redirects"),
                       (["--allowed-local-media-path", str(tmp_path / "nope")], "--allowed-local-media-path")):
        with pytest.raises(ConfigError) as info:
            config_from_args(argv)
        assert info.value.flag == flag
