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


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate the JSON body; raises APIError(400) naming the offending field."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", param="model")
    messages, urls = _messages(body.get("messages"))
    if body.get("n", 1) != 1:
        raise bad_request("only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens <= 0):
        raise bad_request(f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad_request("'top_p' must be > 0", param="top_p")
    top_k = body.get("top_k", 0)
    if not _is_int(top_k) or top_k < -1:
        raise bad_request("'top_k' must be an integer >= 0 (or -1 for off)", param="top_k")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise bad_request("'seed' must be a non-negative integer", param="seed")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad_request("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    return ChatRequest(model=model, messages=messages, image_urls=urls, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, top_k=max(top_k, 0), seed=seed, stop=tuple(stop),
                       stream=stream, include_usage=bool(options.get("include_usage", False)),
                       ignore_eos=bool(body.get("ignore_eos", False)))


def _messages(raw: Any) -> tuple[tuple[ChatMessage, ...], tuple[tuple[str, str], ...]]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    messages, urls = [], []
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


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"'{name}' must be a number in [{low}, {high}], got {value!r}", "invalid_request", name)
    return float(value)
