"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web


@dataclass
class APIError(Exception):
    status: int
    message: str
    code: str
    param: str | None = None

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)

    def sse(self) -> bytes:
        return f"data: {json.dumps(self.body())}\n\n".encode()


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code, param)


def from_http_exception(request_method: str, path: str, exc) -> APIError:
    """aiohttp's own HTTP errors (unknown route, body too large, ...) in the OpenAI shape."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 408: "request_timeout"}
    if exc.status == 404:
        message = f"no route for {request_method} {path}"
    elif exc.status == 405:
        message = f"method {request_method} not allowed on {path}"
    else:
        message = exc.reason or exc.text or f"HTTP {exc.status}"
    return APIError(exc.status, message, codes.get(exc.status, f"http_{exc.status}"))
