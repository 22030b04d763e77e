"""`epd operator` as a real process for the e2e tests, authenticated as the
chart's ServiceAccount (so every call it makes is checked by RBAC)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from epd.workers.launcher.processes import free_port

from .controlplane import ControlPlane, wait_for

SYSTEM = "epd-system"
SERVICE_ACCOUNT = "epd-epd-serve"  # the chart's, for release "epd"


class Operator:
    def __init__(self, plane: ControlPlane, kubeconfig: Path, *extra: str) -> None:
        self.plane = plane
        self.kubeconfig = kubeconfig
        self.extra = extra
        self.process: subprocess.Popen | None = None
        self.log: list[str] = []

    def launch(self) -> None:
        """Start without waiting (a standby prints EPD_OPERATOR_WAITING and nothing more)."""
        self.log = []
        self.health_port = free_port()
        process = self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "epd.cli", "operator", "--kubeconfig", str(self.kubeconfig),
             "--lease-namespace", SYSTEM, "--operator-namespace", SYSTEM, "--drift-interval", "3",
             "--autoscale-interval", "0.5", "--image", "epd-serve:test", "--health-host", "127.0.0.1",
             "--health-port", str(self.health_port), *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: self.log.extend(process.stdout or ()), daemon=True).start()

    def logged(self, marker: str) -> bool:
        return any(marker in line for line in self.log)

    def start(self) -> None:
        self.launch()
        wait_for(lambda: self.logged("EPD_OPERATOR_LEADING") or not self.running(), 60, "the operator to lead")
        assert self.logged("EPD_OPERATOR_LEADING"), "".join(self.log[-30:])

    def stop(self, deadline: float = 30.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took). Not exiting within `deadline` fails the test."""
        if self.process is None or self.process.poll() is not None:
            return (self.process.returncode if self.process else 0), 0.0
        started = time.monotonic()
        self.process.terminate()
        try:
            code = self.process.wait(deadline)
        except subprocess.TimeoutExpired as exc:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the operator did not exit within {deadline} s of SIGTERM:\n" + "".join(self.log[-20:])) from exc
        return code, time.monotonic() - started

    def endpoint(self, path: str) -> tuple[int, str]:
        """GET the operator's /healthz or /metrics: (status, body)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None
