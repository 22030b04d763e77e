"""The image URL guard with the router's real HTTP client against real HTTP servers
on loopback: a canary counts every hit, so "refused" also means "never fetched"."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import threading

import pytest
from yarl import URL

from epd.workers.models import load_adapter
from epd.workers.router.errors import APIError
from epd.workers.router.image_cost import ImageCostCheck, ImageLimits
from epd.workers.router.images import ImageFetcher, image_session
from epd.workers.security.url_guard import URLPolicy, parse_allow_hosts, refusal

from ..helpers import png_bytes

IMAGE = png_bytes(24, 20, seed=3)


class Canary:
    """A loopback HTTP server that counts requests; /image.png answers an image, /to?url=X redirects."""

    def __init__(self, host: str) -> None:
        self.hits = 0
        canary = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                canary.hits += 1
                if self.path.startswith("/to?url="):
                    self.send_response(302)
                    self.send_header("Location", self.path.removeprefix("/to?url="))
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(IMAGE)))
                self.end_headers()
                self.wfile.write(IMAGE)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def canary():
    server = Canary("127.0.0.1")
    yield server
    server.server.shutdown()


@pytest.fixture
def second_host():
    """Another loopback address (127.0.0.2), treated as public by `PublicSecondHost` below."""
    server = Canary("127.0.0.2")
    yield server
    server.server.shutdown()


class PublicSecondHost(URLPolicy):
    """Test-only policy: 127.0.0.2 stands in for a public image host (nothing here reaches the
    internet), every other address is judged as in production."""

    def check_address(self, address, host):
        if address != ipaddress.ip_address("127.0.0.2"):
            super().check_address(address, host)


def fetch(policy: URLPolicy, url: str) -> bytes:
    async def run():
        async with image_session(policy) as session:
            limits = ImageLimits(fetch_timeout=5)
            fetcher = ImageFetcher(limits, session, policy, ImageCostCheck(load_adapter("tiny-llava"), limits))
            return await fetcher.fetch(url, "messages[0].content[0].image_url")
    return asyncio.run(run())


def refused(policy: URLPolicy, url: str) -> APIError:
    with pytest.raises(APIError) as caught:
        fetch(policy, url)
    assert (caught.value.status, caught.value.code) == (400, "image_url_not_allowed")
    assert caught.value.param == "messages[0].content[0].image_url"
    return caught.value


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.7", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local (cloud metadata)"), ("fd00:ec2::254", "private"),
    ("100.100.100.200", "non-public"), ("0.0.0.0", "private"), ("::ffff:127.0.0.1", "loopback"),
    ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"), ("2002:a00:1::", "private"),
    ("8.8.8.8", ""), ("2606:4700::1111", ""),
])
def test_addresses_are_classified(address, reason):
    assert refusal(ipaddress.ip_address(address)) == reason


def test_loopback_by_ip_and_by_name_is_refused_and_never_fetched(canary):
    error = refused(URLPolicy(), canary.url + "/image.png")
    assert "127.0.0.1, a loopback address" in error.message
    error = refused(URLPolicy(), canary.url.replace("127.0.0.1", "localhost") + "/image.png")
    assert "resolves to 127.0.0.1" in error.message
    assert canary.hits == 0


def test_the_metadata_address_is_refused_before_any_connection():
    error = refused(URLPolicy(), "http://169.254.169.254/latest/meta-data/")
    assert "link-local (cloud metadata)" in error.message


def test_a_redirect_to_loopback_is_checked_again_and_never_followed(canary, second_host):
    policy = PublicSecondHost()
    assert fetch(policy, second_host.url + "/image.png") == IMAGE  # the stand-in public host serves
    error = refused(policy, f"{second_host.url}/to?url={canary.url}/image.png")
    assert "loopback" in error.message
    assert (canary.hits, second_host.hits) == (0, 2)


def test_allow_private_lets_loopback_through(canary):
    assert fetch(URLPolicy(allow_private=True), canary.url + "/image.png") == IMAGE
    assert canary.hits == 1


def test_the_host_allow_list(canary, second_host):
    policy = PublicSecondHost(allow_hosts=parse_allow_hosts(["images.example.com", "*.cdn.example.org"]))
    error = refused(policy, second_host.url + "/image.png")
    assert "not in the image URL allow-list" in error.message
    assert second_host.hits == 0
    policy.check_url(URL("https://a.b.cdn.example.org/x.png"))
    policy.check_url(URL("https://images.example.com/x.png"))
    with pytest.raises(ValueError, match="give a host name"):
        parse_allow_hosts(["http://x/"])
    assert fetch(URLPolicy(allow_private=True, allow_hosts=("127.0.0.1",)), canary.url + "/image.png") == IMAGE
