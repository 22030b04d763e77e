"""The harness itself: a real apiserver with RBAC, scheduling onto kwok nodes,
garbage collection through owner references, and a clean teardown."""

from __future__ import annotations

import os

import pytest

from e2e.controlplane import ControlPlane, start_control_plane, wait_for

pytestmark = pytest.mark.controlplane


def deployment(name: str, replicas: int = 2) -> dict:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "c", "image": "example.invalid/none"}],
                                           "tolerations": [{"operator": "Exists"}]}}}}


def ready_pods(plane: ControlPlane, namespace: str, selector: str) -> list[dict]:
    pods = plane.get("pods", "-n", namespace, "-l", selector)["items"]
    return [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                   for c in p["status"].get("conditions", []))]


def test_pods_are_scheduled_onto_kwok_nodes_and_become_ready(k8s_cluster, namespace, gpu_pools):
    k8s_cluster.apply(deployment("web"), namespace=namespace)
    pods = wait_for(lambda: len(ready_pods(k8s_cluster, namespace, "app=web")) == 2
                    and ready_pods(k8s_cluster, namespace, "app=web"), what="2 ready pods")
    assert all(p["spec"]["nodeName"].startswith("gpu-") for p in pods)


def test_rbac_refuses_a_service_account_without_permissions(k8s_cluster, namespace, tmp_path):
    k8s_cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    config = k8s_cluster.service_account_kubeconfig(namespace, "nobody", tmp_path / "nobody.kubeconfig")
    denied = k8s_cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=config, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr
    k8s_cluster.kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    k8s_cluster.kubectl("create", "rolebinding", "nobody-reads", "--role=pod-reader",
                        f"--serviceaccount={namespace}:nobody", "-n", namespace)
    wait_for(lambda: k8s_cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=config,
                                         check=False).returncode == 0, what="the RoleBinding to take effect")


def test_deleting_an_owner_cascades_to_its_children(k8s_cluster, namespace, gpu_pools):
    k8s_cluster.apply(deployment("gc", 1), namespace=namespace)
    wait_for(lambda: k8s_cluster.get("replicasets", "-n", namespace, "-l", "app=gc")["items"], what="a ReplicaSet")
    k8s_cluster.kubectl("delete", "deployment", "gc", "-n", namespace)
    wait_for(lambda: not k8s_cluster.get("replicasets", "-n", namespace, "-l", "app=gc")["items"]
             and not k8s_cluster.get("pods", "-n", namespace, "-l", "app=gc")["items"], what="garbage collection")


def test_kwok_nodes_renew_leases_like_kubelets(k8s_cluster, gpu_pools):
    """Without node Leases the node controller marks kwok nodes NotReady every minute (kwok refreshes
    node status less often than the grace period), and every pod on them loses Ready."""
    node = f"{gpu_pools['decode']}-0"

    def renewed() -> str:
        return k8s_cluster.kubectl("get", "lease", node, "-n", "kube-node-lease", "-o", "jsonpath={.spec.renewTime}",
                                   check=False).stdout

    first = wait_for(renewed, 60, "the node's Lease")
    wait_for(lambda: renewed() != first, 60, "the Lease renewed")
    ready = next(c for c in k8s_cluster.get("node", node)["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_teardown_leaves_no_processes():
    plane = start_control_plane()
    pids = [p.pid for p in plane.processes.values()]
    workdir = plane.workdir
    plane.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not workdir.exists()
