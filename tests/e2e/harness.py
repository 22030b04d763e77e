"""`epd serve` as a real subprocess, plus helpers to read its workers' state."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

from epd.workers.launcher.processes import Child, ProcessGroup, free_port
from epd.workers.launcher.processes import start_serve as start_serve_process
from epd.workers.registry import KEY_PREFIX, WorkerInfo

from ..conftest import RedisServer
from ..helpers import png_bytes  # noqa: F401  (re-exported for the tests)


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def chat_body(model: str, text: str, images: list[bytes], max_tokens: int = 8, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in images]
    content.append({"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **extra}


@dataclass
class Served:
    model: str
    base_url: str
    redis: RedisServer
    child: Child  # `epd serve` itself
    router_metrics_url: str  # from the ready line: the router serves /metrics on its own port

    @property
    def process(self) -> subprocess.Popen:
        return self.child.process

    @property
    def log(self) -> list[str]:
        return list(self.child.lines)

    def workers(self, stage: str) -> list[WorkerInfo]:
        client = self.redis.client()
        keys = client.keys(KEY_PREFIX + f"{stage}:*")
        return sorted((WorkerInfo.from_json(v) for v in client.mget(keys) if v), key=lambda w: w.address) if keys else []

    def metric(self, url: str, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over the series matching `labels`."""
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except (urllib.error.URLError, ConnectionError):
            return 0.0  # a killed worker whose record has not expired yet
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
                    total += float(value)
        return total

    def stage_metric(self, stage: str, name: str, **labels: str) -> float:
        return sum(self.metric(w.metrics_url, name, **labels) for w in self.workers(stage))

    def router_metric(self, name: str, **labels: str) -> float:
        return self.metric(self.router_metrics_url, name, **labels)

    def pending_cache_keys(self) -> list[bytes]:
        client = self.redis.client()
        return [k for k in client.keys("epd:mm:*") if client.hget(k, "state") == b"pending"]

    def stop(self) -> None:
        ProcessGroup.stop_child(self.child, grace=60)


def start_serve(model: str, redis_server: RedisServer | None, *extra: str) -> Served:
    """`epd serve` on `redis_server`, or (None) on the redis-server it starts and supervises itself."""
    port = free_port()
    external = ["--redis-url", redis_server.url] if redis_server else []
    group = ProcessGroup(quiet=True, keep_lines=None)
    try:
        child = start_serve_process(group, model, port, *external, *extra, timeout=300)
    except RuntimeError as exc:
        group.stop()
        raise AssertionError(f"epd serve failed to start: {exc}") from None
    fields = child.ready_fields
    if redis_server is None:
        redis_server = RedisServer(int(fields["redis"].rsplit(":", 1)[1].split("/")[0]), None)
    return Served(model, f"http://127.0.0.1:{port}/v1", redis_server, child, fields["router-metrics"])


def counts_by_stage(served: Served) -> dict[str, int]:
    found: dict[str, int] = defaultdict(int)
    for stage in ("encode", "prefill", "decode"):
        found[stage] = len(served.workers(stage))
    return found


def running(pid: int) -> bool:
    """Whether a process with this pid still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
