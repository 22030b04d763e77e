"""The autoscaler on a real Prometheus: `epd serve` under `epd bench` load,
scraped by a Prometheus server (labelled as the chart's PodMonitor labels
pods), and the operator, pointed at that server and at the harness's
apiserver, scales the stage the load strains (decode, against a TPOT target
no CPU meets) and says why in status. Nothing else moves."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from .controlplane import wait_for
from .prometheus_server import PrometheusServer
from .resources import STAGES, epd, events, minimal, ready, replicas
from .serve_process import ServeProcess

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]


def host(url: str) -> str:
    return urlsplit(url).netloc


def test_prometheus_source_scales_decode_under_bench_load(k8s_cluster, operator, namespace, tmp_path):
    with ServeProcess("tiny-llava") as served:
        targets = {"router": [host(served.router_metrics_url)],
                   **{stage: [host(url) for url in served.worker_metrics_urls(stage)] for stage in STAGES}}
        with PrometheusServer(targets, {"namespace": namespace, "epd_deployment": "bench"}) as prometheus:
            spec = {"encode": {"replicas": 1, "maxReplicas": 1}, "prefill": {"replicas": 1, "maxReplicas": 1},
                    "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3},
                    "slo": {"ttftSeconds": 60, "tpotSeconds": 0.001},  # 1 ms per token: no CPU decode meets it
                    "autoscaling": {"enabled": True, "metricsSource": "prometheus", "windowSeconds": 8,
                                    "cooldownSeconds": 0, "prometheus": {"url": prometheus.url}}}
            k8s_cluster.apply(minimal("bench", **spec), namespace=namespace)
            wait_for(lambda: ready(k8s_cluster, namespace, "bench"), 90, "the deployment Ready")
            bench = subprocess.Popen([sys.executable, "-P", "-m", "epd.cli", "bench", "--base-url", served.base_url,
                                      "--rate", "2", "--duration", "600", "--max-tokens", "24", "--prompt-tokens", "16",
                                      "--images-per-request", "1", "--image-size", "64x64", "--no-progress",
                                      "--out", str(tmp_path / "bench.json")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(lambda: replicas(k8s_cluster, namespace, "statefulset", "bench-decode") > 1, 240,
                         "decode scaled up from Prometheus' figures")
            finally:
                bench.terminate()
                bench.wait(30)
            status = epd(k8s_cluster, namespace, "bench")["status"]
            decode = status["stages"]["decode"]
            assert decode["scaledReplicas"] > 1 and decode["lastScaleReason"].startswith("scale up: TPOT p90")
            assert status["observed"]["tpotP90Seconds"] > 0.001  # what Prometheus measured
            assert {h["stage"] for h in status["scalingHistory"]} == {"decode"}
            assert all(h["to"] > h["from"] for h in status["scalingHistory"])
            assert replicas(k8s_cluster, namespace, "epdstage", "bench-decode") == decode["scaledReplicas"]
            for stage in ("encode", "prefill"):
                assert replicas(k8s_cluster, namespace, "statefulset", f"bench-{stage}") == 1
            assert not events(k8s_cluster, namespace, "bench", "MetricsUnavailable")
