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
