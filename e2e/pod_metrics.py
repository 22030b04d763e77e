"""kwok pods run no containers, so their /metrics are simulated: this process's
Prometheus registry (the workers' and router's real metric definitions) is
served on every pod's own address (kwok gives pods loopback IPs) at the port
the operator reads. The test drives the values; the operator scrapes over HTTP."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Self
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from .controlplane import ControlPlane


@dataclass
class PodMetrics:
    plane: ControlPlane
    namespace: str
    instance: str
    ports: dict[str, int]  # app.kubernetes.io/component -> metrics port
    servers: dict[tuple[str, int], WSGIServer] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Self:
        threading.Thread(target=self._follow_pods, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for server in self.servers.values():
            server.shutdown()

    def _follow_pods(self) -> None:
        while not self._stop.is_set():
            pods = self.plane.get("pods", "-n", self.namespace, "-l", f"app.kubernetes.io/instance={self.instance}")
            for pod in pods["items"]:
                port = self.ports.get(pod["metadata"]["labels"].get("app.kubernetes.io/component", ""))
                ip = pod.get("status", {}).get("podIP")
                if port and ip and (ip, port) not in self.servers:
                    self.servers[(ip, port)], _ = start_http_server(port, addr=ip)
            self._stop.wait(0.2)  # polling the pod list while the test runs
