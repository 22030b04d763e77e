"""A real Prometheus server (the `prometheus` binary, e.g. Debian's package)
scraping given targets every second, each target labelled the way the chart's
PodMonitor labels pods (namespace, epd_deployment, epd_component)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import yaml

from epd.workers.launcher.processes import free_port

from .controlplane import wait_for


@dataclass
class PrometheusServer:
    targets: dict[str, list[str]]  # epd_component -> host:port of its /metrics
    labels: dict[str, str]  # namespace, epd_deployment
    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="epd-prometheus-")))
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        binary = shutil.which("prometheus")
        if binary is None:
            raise AssertionError("prometheus is not installed: run `bash scripts/setup.sh`")
        scrape = [{"targets": hosts, "labels": {**self.labels, "epd_component": component}}
                  for component, hosts in self.targets.items()]
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "epd", "static_configs": scrape}]}
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.workdir / "prometheus.log", "w")
        self.process = subprocess.Popen([binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                                         f"--storage.tsdb.path={self.workdir / 'data'}",
                                         f"--web.listen-address=127.0.0.1:{self.port}"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.all_up, 60, "Prometheus to scrape every target")
        return self

    def __exit__(self, *_) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())["data"]["result"]
        except (urllib.error.URLError, OSError):
            return []

    def all_up(self) -> bool:
        wanted = sum(len(hosts) for hosts in self.targets.values())
        return sum(float(r["value"][1]) for r in self.query("up")) == wanted
