"""Pytest fixtures over the real control plane (see controlplane.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from .controlplane import ControlPlane, MissingBinaries, start_control_plane


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
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false")


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
