"""Reading a request body within its limits, cheaply and off the event loop.

Checked in order of cost: the media type and the declared length (nothing
read yet), the body within a deadline, then JSON parsing and a walk over every
string on a worker thread (a large body never blocks `/health`)."""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..timeouts import within
from .errors import APIError, bad_request

_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's \uXXXX escapes can produce them; UTF-8 cannot carry them


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 64 * 1024 * 1024
    header_timeout: float = 15.0  # a connection must send a complete request head this soon (also idle)
    body_timeout: float = 60.0  # and then its body this soon

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0 or self.header_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError("body size and timeouts must be positive")


async def read_json(request: web.Request, limits: RequestLimits, executor: Executor) -> Any:
    """The parsed JSON body; APIError 415 / 413 / 408 / 400 otherwise."""
    if request.content_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {request.content_type!r}",
                       "unsupported_media_type")
    if (request.content_length or 0) > limits.max_body_bytes:
        raise _too_large(request.content_length or 0, limits)
    try:
        raw = await within(request.read(), limits.body_timeout)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g}s",
                       "request_timeout") from None
    except web.HTTPRequestEntityTooLarge:  # chunked bodies have no length up front
        raise _too_large(limits.max_body_bytes + 1, limits) from None
    return await asyncio.get_running_loop().run_in_executor(executor, parse_json, raw)


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, and no string holding a lone surrogate (`"\\ud800"`),
    which no tokenizer or protobuf field can carry."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8: {exc}", "invalid_json") from exc
    except RecursionError:
        raise bad_request("request body is not valid JSON: nested too deeply", "invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python converts
        raise bad_request(f"request body is not valid JSON: {exc}", "invalid_json") from exc
    _check_strings(body)
    return body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_strings(body: Any) -> None:
    """Walk the document without recursion; APIError naming the path of the first bad string."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _valid_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _valid_text(key, path)
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _valid_text(text: str, path: str) -> None:
    if text.isascii():  # most strings by bytes (base64 images): checked at C speed, nothing to look for
        return
    found = _SURROGATE.search(text)
    if found:
        raise bad_request(f"{path or 'a key'} holds a lone surrogate ({found.group()!r} at {found.start()}); "
                          "text must be valid Unicode", "invalid_text", path or None)


def _too_large(size: int, limits: RequestLimits) -> APIError:
    return APIError(413, f"request body of {size} bytes exceeds the limit of {limits.max_body_bytes} bytes",
                    "request_too_large")
