"""One scalable object per stage: `kubectl scale epdstage`, a
HorizontalPodAutoscaler (the controller-manager's HPA controller reads the
/scale subresource) and the built-in autoscaler all go through the EPDStage."""

from __future__ import annotations

import json

import pytest

from .controlplane import wait_for
from .resources import ROOT, STAGES, children, epd, events, minimal, ready, replicas
from .test_operator import owned_by_operator

pytestmark = pytest.mark.controlplane


def test_kubectl_scale_changes_the_stage_and_nothing_else(k8s_cluster, operator, namespace):
    k8s_cluster.apply(minimal(), namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready")
    before = {k: owned_by_operator(v) for k, v in children(k8s_cluster, namespace, "tiny").items()}
    generation = epd(k8s_cluster, namespace, "tiny")["metadata"]["generation"]
    k8s_cluster.kubectl("scale", "epdstage", "tiny-encode", "-n", namespace, "--replicas", "3")
    wait_for(lambda: replicas(k8s_cluster, namespace, "statefulset", "tiny-encode") == 3, 30, "encode at 3")
    stage = wait_for(lambda: (s := k8s_cluster.get("epdstage", "tiny-encode", "-n", namespace))["status"].get(
        "readyReplicas") == 3 and s, 60, "3 ready encode pods reported by the EPDStage")
    assert stage["status"]["selector"] == "app.kubernetes.io/instance=tiny,app.kubernetes.io/component=encode"
    assert len(k8s_cluster.get("pods", "-n", namespace, "-l", stage["status"]["selector"])["items"]) == 3
    wait_for(lambda: epd(k8s_cluster, namespace, "tiny")["status"]["stages"]["encode"]["summary"] == "3/3", 30,
             "the deployment's status follows")
    after = {k: owned_by_operator(v) for k, v in children(k8s_cluster, namespace, "tiny").items()}
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {"EPDStage/tiny-encode", "StatefulSet/tiny-encode"}, changed  # what was scaled, and its pods
    assert epd(k8s_cluster, namespace, "tiny")["metadata"]["generation"] == generation  # the spec is untouched
    for stage_name in ("prefill", "decode"):
        assert replicas(k8s_cluster, namespace, "statefulset", f"tiny-{stage_name}") == 1
    table = k8s_cluster.kubectl("get", "epdstage", "-n", namespace).stdout.split("\n")[0].split()
    assert table == ["NAME", "DEPLOYMENT", "STAGE", "DESIRED", "CURRENT", "READY", "AGE"]


def test_an_hpa_can_target_a_stage(k8s_cluster, operator, namespace):
    k8s_cluster.apply(minimal(), namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready")
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "decode"},
           "spec": {"scaleTargetRef": {"apiVersion": "serving.epd.dev/v1alpha1", "kind": "EPDStage",
                                       "name": "tiny-decode"},
                    "minReplicas": 2, "maxReplicas": 4,
                    "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                        "type": "Utilization", "averageUtilization": 80}}}]}}
    k8s_cluster.apply(hpa, namespace=namespace)

    def able_to_scale() -> dict | None:
        # (a controller-manager that has not yet re-read discovery since the CRD appeared reports
        # FailedGetScale first, and retries)
        status = k8s_cluster.get("hpa", "decode", "-n", namespace).get("status", {})
        return next((c for c in status.get("conditions", []) if c["type"] == "AbleToScale" and c["status"] == "True"),
                    None)

    resolved = wait_for(able_to_scale, 120, "the HPA controller to read the EPDStage's scale")
    assert resolved["reason"] in ("SucceededGetScale", "SucceededRescale"), resolved
    scale = json.loads(k8s_cluster.kubectl("get", "--raw", f"/apis/serving.epd.dev/v1alpha1/namespaces/{namespace}/"
                                                            "epdstages/tiny-decode/scale").stdout)
    assert scale["kind"] == "Scale" and scale["status"]["selector"] == \
        "app.kubernetes.io/instance=tiny,app.kubernetes.io/component=decode"
    # the example HPA (a custom per-pod metric) is a valid object too
    example = k8s_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f",
                                  str(ROOT / "examples" / "decode-hpa.yaml"))
    assert "horizontalpodautoscaler.autoscaling/llava-7b-decode created (server dry run)" in example.stdout
    # below its minReplicas the HPA scales the stage up, whatever its metrics say
    wait_for(lambda: replicas(k8s_cluster, namespace, "statefulset", "tiny-decode") == 2, 90,
             "the HPA's minimum applied to the decode StatefulSet")


def test_the_builtin_autoscaler_wins_while_enabled(k8s_cluster, operator, namespace):
    scaling = {"enabled": True, "windowSeconds": 600}
    k8s_cluster.apply(minimal(decode={"replicas": 1, "minReplicas": 1, "maxReplicas": 4}, autoscaling=scaling),
                      namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready")
    # the scaler's last choice, as it records it
    k8s_cluster.kubectl("patch", "epd", "tiny", "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", '{"status": {"stages": {"decode": {"scaledReplicas": 2}}}}')
    wait_for(lambda: replicas(k8s_cluster, namespace, "epdstage", "tiny-decode") == 2, 30, "the choice applied")
    k8s_cluster.kubectl("scale", "epdstage", "tiny-decode", "-n", namespace, "--replicas", "4")
    wait_for(lambda: any("decode 4 -> 2" in e["message"] for e in events(k8s_cluster, namespace, "tiny",
                                                                        "StageScaled")), 30, "the write reverted")
    assert replicas(k8s_cluster, namespace, "epdstage", "tiny-decode") == 2
    # autoscaling off: its choice is forgotten and an external scaler's value stands
    k8s_cluster.apply(minimal(decode={"replicas": 1, "minReplicas": 1, "maxReplicas": 4}), namespace=namespace)
    wait_for(lambda: "scaledReplicas" not in epd(k8s_cluster, namespace, "tiny")["status"]["stages"]["decode"], 30,
             "the choice forgotten")
    k8s_cluster.kubectl("scale", "epdstage", "tiny-decode", "-n", namespace, "--replicas", "4")
    wait_for(lambda: replicas(k8s_cluster, namespace, "statefulset", "tiny-decode") == 4, 30, "decode at 4")
    assert all(replicas(k8s_cluster, namespace, "epdstage", f"tiny-{s}") == (4 if s == "decode" else 1)
               for s in STAGES)
