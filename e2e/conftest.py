"""Pytest fixtures over the real control plane (see controlplane.py)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .controlplane import ControlPlane, MissingBinaries, start_control_plane, wait_for
from .operator_process import SERVICE_ACCOUNT, SYSTEM, Operator

CHART = Path(__file__).resolve().parent.parent / "helm" / "epd-serve"


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok for the whole session."""
    try:
        plane = start_control_plane()
    except MissingBinaries as exc:
        pytest.fail(str(exc))  # CI builds them first: a missing binary is an error, not a skip
    yield plane
    plane.stop()


@pytest.fixture
def namespace(k8s_cluster: ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", name)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="session")
def gpu_pools(k8s_cluster: ControlPlane) -> dict[str, str]:
    """Three kwok GPU node pools, one per stage, labelled and tainted like a real cluster's."""
    pools = {}
    for stage in ("encode", "prefill", "decode"):
        pool = f"gpu-{stage}"
        for i in range(2):
            k8s_cluster.add_fake_node(f"{pool}-{i}", {"epd.dev/pool": pool}, gpus=8,
                                      taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
        pools[stage] = pool
    return pools


@pytest.fixture(scope="session")
def operator(k8s_cluster: ControlPlane, gpu_pools, tmp_path_factory) -> Iterator[Operator]:
    """The chart installed (CRDs, ServiceAccount, RBAC; its Deployment at 0 replicas) and the operator
    run here as that ServiceAccount. A test that stops it starts it again before it ends."""
    k8s_cluster.kubectl("create", "namespace", SYSTEM)
    k8s_cluster.add_fake_node("cpu-0", {"epd.dev/pool": "cpu"})  # untainted: routers, Redis, untargeted stages
    k8s_cluster.helm("install", "epd", str(CHART), "--namespace", SYSTEM, "--set", "operator.replicas=0",
                     "--wait", "--timeout", "60s")
    for crd in ("epddeployments.serving.epd.dev", "epdstages.serving.epd.dev"):
        wait_for(functools.partial(k8s_cluster.crd_established, crd), 30, crd)
    kubeconfig = k8s_cluster.service_account_kubeconfig(SYSTEM, SERVICE_ACCOUNT,
                                                        tmp_path_factory.mktemp("sa") / "operator.kubeconfig")
    op = Operator(k8s_cluster, kubeconfig)
    op.start()
    yield op
    op.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the operator shows the operator's last log lines."""
    outcome = yield
    report = outcome.get_result()
    op = getattr(item, "funcargs", {}).get("operator")
    if report.when == "call" and report.failed and isinstance(op, Operator):
        report.sections.append(("operator log (last 200 lines)", "".join(op.log[-200:])))
