"""Router API keys: `Authorization: Bearer <key>` on every path but the open ones.

Keys come from `--api-key` (repeatable), `--api-key-file FILE` (one per line,
`#` comments) and the comma-separated `EPD_API_KEYS`; with none configured the
router is open. Comparison is constant-time: both sides are hashed to equal
length first, and every configured key is compared, so neither the position of
a mismatch nor which key matched shows in the timing."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

API_KEYS_ENV = "EPD_API_KEYS"


@dataclass(frozen=True)
class APIKeys:
    digests: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, keys: Iterable[str]) -> APIKeys:
        found = [key.strip() for key in keys if key.strip()]
        return cls(tuple(_digest(key) for key in dict.fromkeys(found)))

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries one of the keys."""
        scheme, _, presented = (authorization or "").partition(" ")
        digest = _digest(presented.strip() if scheme.lower() == "bearer" else "")
        matched = False
        for key in self.digests:
            matched |= hmac.compare_digest(digest, key)
        return matched


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def add_api_key_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help=f"accept this key (repeatable; also ${API_KEYS_ENV}, comma-separated)")
    parser.add_argument("--api-key-file", action="append", default=[], metavar="FILE",
                        help="accept the keys in this file, one per line (repeatable)")


def api_keys_from(flags: Sequence[str], files: Sequence[str], environ: Mapping[str, str] | None = None) -> APIKeys:
    """Every configured key; ValueError for an unreadable or empty key file."""
    keys = list(flags) + (os.environ if environ is None else environ).get(API_KEYS_ENV, "").split(",")
    for name in files:
        try:
            lines = Path(name).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"--api-key-file {name}: {exc.strerror or exc}") from exc
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"--api-key-file {name} holds no key")
        keys += found
    return APIKeys.of(keys)
