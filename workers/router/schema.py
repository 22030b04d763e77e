"""Parsing and validating an OpenAI chat-completions request body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..messages import ChatMessage, ImagePart, SamplingParams, TextPart
from .errors import APIError, bad_request

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    image_urls: tuple[tuple[str, str], ...]  # (url, json path of the part) in prompt order
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos)


INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate the JSON body; raises APIError(400) naming the offending field. Every number is
    bounded (what the wire and the engines can hold), so nothing out of range reaches a worker."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", param="model")
    messages, urls = _messages(body.get("messages"))
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise bad_request("only n=1 is supported", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, None, 1, INT32_MAX)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad_request("'top_p' must be > 0", param="top_p")
    top_k = _integer(body, "top_k", 0, -1, INT32_MAX) or 0
    seed = _integer(body, "seed", None, 0, UINT64_MAX)
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(body, penalty, 0.0, -2.0, 2.0):
            raise bad_request(f"'{penalty}' is not supported; send 0 or leave it out", param=penalty)
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad_request("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    return ChatRequest(model=model, messages=messages, image_urls=urls, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, top_k=max(top_k, 0), seed=seed, stop=tuple(stop),
                       stream=stream, include_usage=_flag(options, "include_usage", "stream_options.include_usage"),
                       ignore_eos=_flag(body, "ignore_eos"))


def _messages(raw: Any) -> tuple[tuple[ChatMessage, ...], tuple[tuple[str, str], ...]]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    messages: list[ChatMessage] = []
    urls: list[tuple[str, str]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
        content = message.get("content")
        parts: list[TextPart | ImagePart] = []
        if isinstance(content, str):
            parts.append(TextPart(content))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                path = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(TextPart(part["text"]))
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise bad_request(f"{path}.image_url.url must be a string", param=f"{path}.image_url")
                    if message["role"] != "user":
                        raise bad_request(f"{where}: images are only allowed in user messages", param=path)
                    parts.append(ImagePart(len(urls)))
                    urls.append((url, f"{path}.image_url"))
                else:
                    raise bad_request(f"{path} must be a text or image_url part", param=path)
        else:
            raise bad_request(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        messages.append(ChatMessage(message["role"], tuple(parts)))
    return tuple(messages), tuple(urls)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer in [{low}, {high}], got {_short(value)}", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"'{name}' must be a number in [{low}, {high}], got {_short(value)}", "invalid_request",
                       name)
    return float(value)


def _flag(body: dict, name: str, param: str = "") -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{param or name}' must be a boolean", param=param or name)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
