"""`epd serve` as a subprocess for the operator's end-to-end tests: its
OpenAI endpoint, the router's /metrics (from its ready line) and every worker's
/metrics (from the discovery records in the Redis it started)."""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass, field
from typing import Self

import redis

from epd.workers.launcher.processes import epd_command, free_port
from epd.workers.registry import KEY_PREFIX, WorkerInfo

from .controlplane import wait_for

READY = "EPD_SERVE_READY"


@dataclass
class ServeProcess:
    model: str
    port: int = field(default_factory=free_port)
    log: list[str] = field(default_factory=list)
    ready: dict[str, str] = field(default_factory=dict)  # key=value fields of the ready line

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def router_metrics_url(self) -> str:
        return self.ready["router-metrics"]

    def worker_metrics_urls(self, stage: str) -> list[str]:
        client = redis.Redis.from_url(self.ready["redis"])
        records = [client.get(key) for key in client.keys(f"{KEY_PREFIX}{stage}:*")]
        return sorted(WorkerInfo.from_json(r).metrics_url for r in records if r)

    def __enter__(self) -> Self:
        self.process = subprocess.Popen(epd_command("serve", "--model", self.model, "--port", str(self.port)),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)

        def read() -> None:
            for line in self.process.stdout or ():
                self.log.append(line)
                if line.startswith(READY):
                    for key, _, value in (part.partition("=") for part in line.split() if "=" in part):
                        self.ready[key] = value

        threading.Thread(target=read, daemon=True).start()
        wait_for(lambda: self.ready or self.process.poll() is not None, 300, "epd serve to be ready")
        if not self.ready:
            raise AssertionError("epd serve did not start:\n" + "".join(self.log[-40:]))
        return self

    def __exit__(self, *_) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)
