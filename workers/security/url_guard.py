"""Server-side request forgery guard for image URLs.

The router fetches images on behalf of anyone who can post a request. Without
a guard that is a way to reach loopback services, the pod network, and the
cloud metadata endpoint (169.254.169.254). Every address a URL's host resolves
to is checked, by the resolver the HTTP client connects through (so the
address checked is the address used: no rebinding between check and connect);
literal IP hosts are checked before any connection; each redirect is checked
again as a new URL. An optional host allow-list narrows it further."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

NAT64 = ipaddress.ip_network("64:ff9b::/96")


class URLRefused(Exception):
    """The URL may not be fetched; the message says why."""


@dataclass(frozen=True)
class URLPolicy:
    allow_private: bool = False  # --allow-private-image-urls: no address check at all
    allow_hosts: tuple[str, ...] = ()  # exact host names, or "*.example.com" for any subdomain

    def check_url(self, url: URL) -> None:
        """Scheme, host allow-list and (for a literal IP host) the address; URLRefused otherwise."""
        if url.scheme not in ("http", "https"):
            raise URLRefused(f"scheme {url.scheme!r} is not http or https")
        host = (url.host or "").rstrip(".").lower()
        if not host:
            raise URLRefused("the URL has no host")
        if self.allow_hosts and not any(_host_matches(host, pattern) for pattern in self.allow_hosts):
            raise URLRefused(f"host {host} is not in the image URL allow-list")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return  # a name: checked when it resolves
        self.check_address(address, host)

    def check_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> None:
        if self.allow_private:
            return
        reason = refusal(address)
        if reason:
            raise URLRefused(f"host {host} resolves to {address}, a {reason} address")


def refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Why an address may not be fetched from ("" if it is a public one)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None)
        if embedded is not None:
            return refusal(embedded)
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata)"
    if address.is_private:
        return "private"
    if address.is_multicast or address.is_unspecified or address.is_reserved or not address.is_global:
        return "non-public"
    return ""


class GuardedResolver(AbstractResolver):
    """Resolves through another resolver and refuses a host if any of its addresses is forbidden
    (a name with one public and one private address could otherwise be steered)."""

    def __init__(self, policy: URLPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            self.policy.check_address(ipaddress.ip_address(result["host"]), host)
        return results

    async def close(self) -> None:
        await self.inner.close()


def _host_matches(host: str, pattern: str) -> bool:
    pattern = pattern.rstrip(".").lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def parse_allow_hosts(values: Sequence[str]) -> tuple[str, ...]:
    """Validated `--image-url-allow-host` values; ValueError on an empty or malformed one."""
    hosts = []
    for value in values:
        name = value.strip().lower()
        bare = name.removeprefix("*.")
        if not bare or "/" in bare or ":" in bare or "*" in bare:
            raise ValueError(f"--image-url-allow-host {value!r}: give a host name or *.domain")
        hosts.append(name)
    return tuple(hosts)
