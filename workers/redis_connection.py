"""Connecting to Redis, the same way in every process.

The URL carries everything: `redis://[:password@]host:port/db`, or
`rediss://...` for TLS (`?ssl_ca_certs=/path/ca.pem`, and `ssl_certfile` /
`ssl_keyfile` for a client certificate). `--redis-url` may be left out when
`EPD_REDIS_URL` is set, which keeps a password out of the process list.
Short socket timeouts keep a stalled Redis from stalling requests: every
caller already treats a Redis error as "unknown" and carries on."""

from __future__ import annotations

import argparse
import os
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis

REDIS_URL_ENV = "EPD_REDIS_URL"
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 3.0


def add_redis_argument(parser: argparse.ArgumentParser) -> None:
    # The environment is read in redis_url(), not used as the default, so --help never prints a password.
    parser.add_argument("--redis-url", default="",
                        help=f"redis:// or rediss:// URL, password included (default: ${REDIS_URL_ENV})")


def redis_url(flag: str) -> str:
    """The URL from the flag, else from the environment; ValueError if neither is set."""
    url = flag or os.environ.get(REDIS_URL_ENV, "")
    if not url:
        raise ValueError(f"give --redis-url or set {REDIS_URL_ENV}")
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"Redis URL {redacted(url)!r} must start with redis://, rediss:// or unix://")
    return url


def connect(url: str) -> aioredis.Redis:
    """An asyncio client; settings in the URL's query string win over these defaults."""
    return aioredis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT)


def redacted(url: str) -> str:
    """The URL with its password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
