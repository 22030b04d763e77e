"""One streamed request, timed: TTFT, per-token gaps, end to end."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    token_gaps: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


async def stream_chat(session: aiohttp.ClientSession, base_url: str, body: dict,
                      request_timeout: float) -> RequestResult:
    start = time.perf_counter()
    first: float | None = None
    last = start
    tokens = 0
    gaps: list[float] = []
    try:
        async with session.post(f"{base_url}/chat/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=request_timeout)) as response:
            if response.status != 200:
                return RequestResult(False, error=f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=chunk["error"].get("message", "stream error"))
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("role") is None:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                    tokens += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, error="no token received")
    return RequestResult(True, ttft=first - start, e2e=end - start, output_tokens=tokens, token_gaps=gaps)
