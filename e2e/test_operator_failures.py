"""Failure discipline and pruning against the real apiserver: a child the
apiserver refuses shows as Degraded/ApplyFailed with its name and the
apiserver's words plus a Warning Event, and is retried until the spec is
fixed; children the spec no longer builds are deleted, and nothing else."""

from __future__ import annotations

import pytest

from .controlplane import wait_for
from .resources import children, condition, epd, events, minimal, ready, status_of

pytestmark = pytest.mark.controlplane


def test_a_refused_child_degrades_the_deployment_with_the_apiservers_words(k8s_cluster, operator, namespace):
    k8s_cluster.apply(minimal(), namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready")
    # A per-pod download cache needs volumeClaimTemplates, which a StatefulSet cannot change in place.
    k8s_cluster.apply(minimal(model={"name": "tiny-llava", "cache": {"storage": "1Gi"}}), namespace=namespace)
    obj = wait_for(lambda: status_of(o := epd(k8s_cluster, namespace, "tiny"), "Degraded") == "True" and o, 30,
                   "Degraded")
    degraded = condition(obj, "Degraded")
    assert degraded["reason"] == "ApplyFailed"
    assert degraded["message"].startswith('StatefulSet/tiny-encode: StatefulSet.apps "tiny-encode" is invalid: '
                                          'spec: Forbidden: updates to statefulset spec'), degraded["message"]
    assert condition(obj, "Ready")["reason"] == "ApplyFailed" and obj["status"]["observedGeneration"] == \
        obj["metadata"]["generation"]
    warnings = wait_for(lambda: len(found := events(k8s_cluster, namespace, "tiny", "ApplyFailed")) >= 2 and found,
                        30, "the failed apply retried (one Warning each time)")
    assert all(e["type"] == "Warning" and e["message"] == degraded["message"] for e in warnings)
    assert operator.running()
    k8s_cluster.apply(minimal(), namespace=namespace)  # the spec fixed: the next retry succeeds
    wait_for(lambda: status_of(epd(k8s_cluster, namespace, "tiny"), "Degraded") == "False" and
             ready(k8s_cluster, namespace, "tiny"), 30, "recovered")


def test_switching_to_an_external_redis_prunes_the_managed_one_and_nothing_else(k8s_cluster, operator, namespace):
    k8s_cluster.apply(minimal(), namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready")
    stranger = {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "tiny-lookalike", "labels": {"app.kubernetes.io/instance": "tiny",
                                                                  "app.kubernetes.io/managed-by": "epd-operator"}},
                "spec": {"selector": {"app": "x"}, "ports": [{"port": 80}]}}
    k8s_cluster.apply(stranger, namespace=namespace)  # labelled like ours, but not owned by the deployment
    k8s_cluster.kubectl("create", "secret", "generic", "external-redis", "-n", namespace,
                        "--from-literal=url=rediss://:pw@redis.example:6380/0")
    k8s_cluster.apply(minimal(cache={"redis": {"urlSecret": "external-redis"}}), namespace=namespace)
    gone = {"StatefulSet/tiny-redis", "Service/tiny-redis", "NetworkPolicy/tiny-redis"}
    wait_for(lambda: not gone & set(children(k8s_cluster, namespace, "tiny")), 30, "the managed Redis pruned")
    wait_for(lambda: not k8s_cluster.get("pods", "-n", namespace, "-l", "app.kubernetes.io/component=redis")["items"],
             60, "the Redis pod gone")
    pruned = wait_for(lambda: events(k8s_cluster, namespace, "tiny", "Pruned"), 30, "a Pruned event")
    assert all(name in pruned[0]["message"] for name in gone)
    found = children(k8s_cluster, namespace, "tiny")
    assert "Service/tiny-lookalike" in found  # never delete what the operator did not make
    env = found["StatefulSet/tiny-decode"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "EPD_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "external-redis", "key": "url"}}} in env
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready on the external Redis")

    k8s_cluster.apply(minimal(cache={"redis": {"urlSecret": "external-redis"}}, networkPolicy={"enabled": False}),
                      namespace=namespace)
    wait_for(lambda: not [k for k in children(k8s_cluster, namespace, "tiny") if k.startswith("NetworkPolicy/")],
             30, "every NetworkPolicy pruned")
