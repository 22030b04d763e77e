"""A stage whose pods cannot download the model says why in its condition.

The encode pod lands on a node with no kubelet, so the test plays the kubelet:
it runs the real `epd worker` as the pod would (a hub that refuses the token),
and reports the container as a kubelet does with FallbackToLogsOnError (the
log's tail as the termination message, then CrashLoopBackOff)."""

from __future__ import annotations

import json

import pytest

from .checkpoints import REPO, sharded_checkpoint, start_worker
from .controlplane import wait_for
from .hub_server import HubServer
from .resources import condition, epd, minimal

pytestmark = pytest.mark.controlplane
NODE = "no-kubelet-0"


def add_node_without_kubelet(k8s_cluster) -> None:
    """Tainted, so that only this test's pod (which tolerates it) lands there: for its first minute a new
    node has no Ready condition, hence no not-ready taint, and would take anyone's pods."""
    k8s_cluster.apply({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": NODE, "labels": {"epd.dev/pool": "manual", "kubernetes.io/hostname": NODE}},
                       "spec": {"taints": [{"key": "epd.dev/no-kubelet", "value": "true", "effect": "NoSchedule"}]}})
    capacity = {"cpu": "8", "memory": "64Gi", "pods": "20"}
    k8s_cluster.kubectl("patch", "node", NODE, "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"capacity": capacity, "allocatable": capacity}}))


def report_crash_loop(k8s_cluster, namespace: str, pod: str, log: str) -> None:
    """What the kubelet writes for a container that exits 2 at every start."""
    status = {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
              "containerStatuses": [{
                  "name": "worker", "ready": False, "restartCount": 3, "image": "epd-serve:test", "imageID": "",
                  "state": {"waiting": {"reason": "CrashLoopBackOff",
                                        "message": f"back-off 40s restarting failed container=worker pod={pod}"}},
                  "lastState": {"terminated": {"exitCode": 2, "reason": "Error", "message": log[-2048:]}}}]}
    k8s_cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": status}))


def test_a_refused_download_is_named_in_the_stage_condition(k8s_cluster, operator, namespace, tmp_path):
    add_node_without_kubelet(k8s_cluster)
    try:
        k8s_cluster.kubectl("create", "secret", "generic", "hf", "-n", namespace, "--from-literal=HF_TOKEN=hf_wrong")
        k8s_cluster.apply(minimal(model={"name": REPO, "secret": "hf"},
                                  encode={"replicas": 1, "nodeSelector": {"epd.dev/pool": "manual"},
                                          "tolerations": [{"operator": "Exists"}]}), namespace=namespace)
        pod = wait_for(lambda: _scheduled(k8s_cluster, namespace), 60, "the encode pod scheduled")
        container = pod["spec"]["containers"][0]
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert {"name": "EPD_MODEL_DOWNLOAD", "value": "1"} in container["env"]
        assert {"secretRef": {"name": "hf"}} in container["envFrom"]

        with HubServer(REPO, sharded_checkpoint(tmp_path / "repo"), token="hf_right") as hub:
            run = start_worker(hub.url, "hf_wrong", tmp_path)  # what the pod's container does, with its token
        assert run.returncode == 2 and "refused the credentials (HTTP 401)" in run.stderr
        report_crash_loop(k8s_cluster, namespace, pod["metadata"]["name"], run.stderr)

        def encode_condition() -> dict | None:
            found = condition(epd(k8s_cluster, namespace, "tiny"), "EncodeReady")
            return found if found.get("reason") == "PodsFailing" else None

        found = wait_for(encode_condition, 30, "EncodeReady to say why")
        assert found["status"] == "False"
        assert found["message"].startswith("0/1 encode workers ready; pod tiny-encode-0: CrashLoopBackOff: "
                                           f"epd worker: cannot download {REPO}@main from http://127.0.0.1:"), \
            found["message"]
        assert "the hub refused the credentials (HTTP 401); HF_TOKEN is wrong" in found["message"]
        ready = condition(epd(k8s_cluster, namespace, "tiny"), "Ready")
        assert ready["status"] == "False" and "encode" in ready["message"]
    finally:
        k8s_cluster.kubectl("delete", "node", NODE, "--wait=false")


def _scheduled(k8s_cluster, namespace: str) -> dict | None:
    pods = k8s_cluster.get("pods", "-n", namespace, "-l", "app.kubernetes.io/component=encode")["items"]
    return next((p for p in pods if p["spec"].get("nodeName") == NODE), None)
