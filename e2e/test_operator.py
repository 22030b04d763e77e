"""The operator against a real kube-apiserver: installed with Helm, run with
the chart's ServiceAccount token, reconciling the examples onto kwok GPU pools."""

from __future__ import annotations

import threading
from typing import Self

import pytest

from .controlplane import wait_for
from .operator_process import SYSTEM, Operator
from .resources import (
    ROOT,
    STAGES,
    children,
    condition,
    epd,
    events,
    example,
    minimal,
    ready,
    replicas,
    status_of,
)

pytestmark = pytest.mark.controlplane
TINY_CHILDREN = 22  # ConfigMap, Redis (Service, StatefulSet), 3 x (EPDStage, Service, StatefulSet, PDB),
#                     router Service + Deployment, 5 NetworkPolicies


def test_minimal_example_creates_every_child(k8s_cluster, operator, namespace):
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "minimal.yaml"))
    wait_for(lambda: len(children(k8s_cluster, namespace, "tiny")) == TINY_CHILDREN, 60, "every child")
    found = children(k8s_cluster, namespace, "tiny")
    owner_uid = epd(k8s_cluster, namespace, "tiny")["metadata"]["uid"]
    for key, child in found.items():
        refs = child["metadata"]["ownerReferences"]
        assert [(r["kind"], r["uid"], r["controller"]) for r in refs] == [("EPDDeployment", owner_uid, True)], key
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "epd-operator"
    for stage in STAGES:
        sts = found[f"StatefulSet/tiny-{stage}"]
        assert sts["metadata"]["labels"]["serving.epd.dev/stage"] == stage
        container = sts["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][:6] == ["epd", "worker", "--role", stage, "--model", "tiny-llava"]
        assert container["readinessProbe"]["grpc"]["port"] == 50052
        assert found[f"Service/tiny-{stage}"]["spec"]["clusterIP"] == "None"
        assert found[f"EPDStage/tiny-{stage}"]["spec"] == {"deployment": "tiny", "stage": stage, "replicas": 1}
    assert found["Deployment/tiny-router"]["spec"]["template"]["spec"]["containers"][0]["command"][:2] == \
        ["epd", "router"]
    secrets = {s["metadata"]["name"]: s["type"] for s in k8s_cluster.get("secrets", "-n", namespace)["items"]}
    assert secrets == {"tiny-tls": "kubernetes.io/tls", "tiny-redis-auth": "Opaque"}
    obj = wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready")
    assert obj["status"]["endpoint"] == f"http://tiny.{namespace}.svc:8000/v1"
    assert obj["status"]["tls"]["issuedBy"] == "operator" and obj["status"]["tls"]["secretName"] == "tiny-tls"
    assert "finalizers" not in obj["metadata"]  # nothing makes a deletion wait for the operator
    assert not [k for k in obj["metadata"].get("annotations", {}) if k.startswith("kopf.")]
    table = k8s_cluster.kubectl("get", "epd", "-n", namespace).stdout.split("\n")[0].split()
    assert table == ["NAME", "READY", "ENCODE", "PREFILL", "DECODE", "TTFT-P90", "AGE"]
    reconciled = wait_for(lambda: events(k8s_cluster, namespace, "tiny", "Reconciled"), 30, "a Reconciled event")
    # the first reconcile applies every child in one pass (child events then find nothing to change)
    assert len(reconciled) == 1 and "ConfigMap/tiny-config" in reconciled[0]["message"], reconciled


def full_example(gpu_pools: dict[str, str]) -> dict:
    manifest = example("full.yaml")
    manifest["spec"]["model"]["name"] = "tiny-llava"
    manifest["spec"]["router"]["replicas"] = 1
    for stage in STAGES:
        assert manifest["spec"][stage]["nodeSelector"] == {"epd.dev/pool": gpu_pools[stage]}
    return manifest


def test_full_example_lands_on_three_pools_becomes_ready_and_scales(k8s_cluster, operator, namespace, gpu_pools):
    k8s_cluster.kubectl("create", "secret", "generic", "redis-credentials", "-n", namespace,
                        "--from-literal=url=redis://:pw@redis.example:6379/0")
    k8s_cluster.kubectl("create", "secret", "generic", "epd-api-keys", "-n", namespace, "--from-literal=api-keys=k1")
    k8s_cluster.apply(full_example(gpu_pools), namespace=namespace)
    obj = wait_for(lambda: ready(k8s_cluster, namespace, "llava-7b"), 90, "Ready=True")
    assert {s: obj["status"]["stages"][s]["summary"] for s in STAGES} == \
        {"encode": "2/2", "prefill": "1/1", "decode": "2/2"}
    for stage in STAGES:
        pods = k8s_cluster.get("pods", "-n", namespace, "-l", f"serving.epd.dev/stage={stage}")["items"]
        nodes = {p["spec"]["nodeName"] for p in pods}
        assert nodes and all(n.startswith(gpu_pools[stage]) for n in nodes), (stage, nodes)
        env = pods[0]["spec"]["containers"][0]["env"]
        assert {"name": "EPD_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "redis-credentials", "key": "url"}}} \
            in env
    assert not k8s_cluster.get("statefulsets", "-n", namespace, "-l", "app.kubernetes.io/component=redis")["items"]

    k8s_cluster.kubectl("patch", "epd", "llava-7b", "-n", namespace, "--type", "merge",
                        "-p", '{"spec": {"decode": {"replicas": 4}}}')
    wait_for(lambda: replicas(k8s_cluster, namespace, "epdstage", "llava-7b-decode") == 4, 30, "EPDStage at 4")
    wait_for(lambda: replicas(k8s_cluster, namespace, "statefulset", "llava-7b-decode") == 4, 30, "decode at 4")
    wait_for(lambda: epd(k8s_cluster, namespace, "llava-7b")["status"]["stages"]["decode"]["summary"] == "4/4",
             60, "status decode 4/4")


def test_the_real_cluster_llava_example_downloads_into_its_shared_cache(k8s_cluster, operator, namespace,
                                                                         gpu_pools):
    volume = f"hf-cache-{namespace}"  # a volume for the example's claim (the harness has no provisioner)
    k8s_cluster.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
                       "spec": {"capacity": {"storage": "40Gi"}, "accessModes": ["ReadWriteMany"],
                                "hostPath": {"path": "/tmp/hf-cache"}, "storageClassName": "",
                                "claimRef": {"namespace": namespace, "name": "hf-cache"}}})
    try:
        k8s_cluster.kubectl("create", "secret", "generic", "hf-token", "-n", namespace,
                            "--from-literal=HF_TOKEN=hf_x")
        k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "llava-1.5-7b.yaml"))
        wait_for(lambda: ready(k8s_cluster, namespace, "llava-7b"), 90, "Ready")
        config = k8s_cluster.get("configmap", "llava-7b-config", "-n", namespace)["data"]
        assert (config["EPD_MODEL"], config["EPD_MODEL_REVISION"]) == ("llava-hf/llava-1.5-7b-hf", "main")
        for pod in k8s_cluster.get("pods", "-n", namespace, "-l", "app.kubernetes.io/instance=llava-7b")["items"]:
            if pod["metadata"]["labels"]["app.kubernetes.io/component"] == "redis":
                continue
            container = pod["spec"]["containers"][0]
            assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in \
                pod["spec"]["volumes"]
            assert {"name": "model-cache", "mountPath": "/var/cache/epd"} in container["volumeMounts"]
            assert {"name": "HF_HUB_CACHE", "value": "/var/cache/epd/hub"} in container["env"]
            assert {"secretRef": {"name": "hf-token"}} in container["envFrom"]
    finally:
        k8s_cluster.kubectl("delete", "pv", volume, "--wait=false")


def test_drift_is_corrected(k8s_cluster, operator, namespace):
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "minimal.yaml"))
    wait_for(lambda: len(children(k8s_cluster, namespace, "tiny")) == TINY_CHILDREN, 60, "children")
    k8s_cluster.kubectl("delete", "service", "tiny-prefill", "-n", namespace)
    wait_for(lambda: "Service/tiny-prefill" in children(k8s_cluster, namespace, "tiny"), 30, "the Service back")
    k8s_cluster.kubectl("delete", "networkpolicy", "tiny-decode", "-n", namespace)
    wait_for(lambda: "NetworkPolicy/tiny-decode" in children(k8s_cluster, namespace, "tiny"), 30, "the policy back")
    k8s_cluster.kubectl("patch", "statefulset", "tiny-encode", "-n", namespace, "--type", "json", "-p",
                        '[{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:1"},'
                        ' {"op": "replace", "path": "/spec/replicas", "value": 5}]')

    def restored() -> bool:
        sts = k8s_cluster.get("statefulset", "tiny-encode", "-n", namespace)
        return sts["spec"]["replicas"] == 1 and sts["spec"]["template"]["spec"]["containers"][0]["image"] == \
            "epd-serve:test"

    wait_for(restored, 30, "image and replicas restored")


def test_validation_refuses_bad_specs(k8s_cluster, operator, namespace):
    cases = {
        "negative replicas": ({"encode": {"replicas": -1}}, "spec.encode.replicas"),
        "min > max": ({"decode": {"replicas": 2, "minReplicas": 3, "maxReplicas": 2}}, "minReplicas must be <="),
        "zero SLO": ({"slo": {"ttftSeconds": 0}}, "spec.slo.ttftSeconds"),
        "redis given two ways": ({"cache": {"redis": {"managed": True, "urlSecret": "x"}}}, "exactly one way"),
        "unknown field": ({"encode": {"replicas": 1, "gpus": 2}}, 'unknown field "spec.encode.gpus"'),
        "absurd quantity": ({"encode": {"resources": {"limits": {"nvidia.com/gpu": "lots"}}}},
                            "spec.encode.resources.limits.nvidia.com/gpu: Invalid value: \"lots\""),
        "negative memory": ({"decode": {"resources": {"requests": {"memory": "-1Gi"}}}},
                            "spec.decode.resources.requests.memory"),
        "model cache two ways": ({"model": {"name": "m/x", "cache": {"pvc": "a", "storage": "1Gi"}}},
                                 "give the cache one way"),
        "metrics port on the public port": ({"router": {"port": 8000, "metricsPort": 8000}},
                                            "metricsPort must differ from port"),
        "unknown tls provider": ({"tls": {"provider": "vault"}}, "spec.tls.provider"),
    }
    for name, (patch, message) in cases.items():
        result = k8s_cluster.apply(minimal("bad", **patch), namespace=namespace, check=False)
        assert result.returncode != 0 and message in result.stderr, (name, result.stderr)


def test_a_secret_created_later_makes_it_ready_within_seconds(k8s_cluster, operator, namespace):
    k8s_cluster.apply(minimal(cache={"redis": {"urlSecret": "does-not-exist"}}), namespace=namespace)
    obj = wait_for(lambda: status_of(o := epd(k8s_cluster, namespace, "tiny"), "Degraded") == "True" and o,
                   30, "Degraded=True")
    degraded = condition(obj, "Degraded")
    assert degraded["reason"] == "SecretNotFound" and "does-not-exist" in degraded["message"]
    assert operator.running()
    k8s_cluster.kubectl("create", "secret", "generic", "does-not-exist", "-n", namespace,
                        "--from-literal=url=redis://:pw@r:6379")
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 5, "Ready within 5 s of the Secret's creation")


def owned_by_operator(child: dict) -> tuple:
    """What the operator controls of a child: its spec generation and the fields it manages."""
    managed = [(m["operation"], m.get("fieldsV1")) for m in child["metadata"].get("managedFields", [])
               if m["manager"] == "epd-operator" and not m.get("subresource")]
    return child["metadata"].get("generation"), managed


def test_restart_changes_nothing_and_delete_removes_everything(k8s_cluster, operator, namespace):
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "minimal.yaml"))
    wait_for(lambda: len(children(k8s_cluster, namespace, "tiny")) == TINY_CHILDREN, 60, "children")
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready")
    before = {k: owned_by_operator(v) for k, v in children(k8s_cluster, namespace, "tiny").items()}
    generation = epd(k8s_cluster, namespace, "tiny")["metadata"]["generation"]
    operator.stop()
    operator.start()
    k8s_cluster.kubectl("annotate", "epd", "tiny", "-n", namespace, "touched=yes")  # an event after the restart
    wait_for(lambda: len(events(k8s_cluster, namespace, "tiny", "Reconciled")) == 1 and
             ready(k8s_cluster, namespace, "tiny"), 30, "the restarted operator to look at it")
    after = {k: owned_by_operator(v) for k, v in children(k8s_cluster, namespace, "tiny").items()}
    assert after == before
    assert epd(k8s_cluster, namespace, "tiny")["metadata"]["generation"] == generation
    k8s_cluster.kubectl("delete", "epd", "tiny", "-n", namespace)
    wait_for(lambda: not children(k8s_cluster, namespace, "tiny"), 60, "garbage collection of every child")
    wait_for(lambda: not k8s_cluster.get("secrets", "-n", namespace)["items"], 60, "the generated Secrets too")


def test_deletes_complete_with_no_operator_running(k8s_cluster, operator, namespace):
    k8s_cluster.apply(minimal(), namespace=namespace)
    k8s_cluster.apply(minimal("other"), namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny") and ready(k8s_cluster, namespace, "other"), 60, "Ready")
    operator.stop()
    try:
        k8s_cluster.kubectl("delete", "epd", "tiny", "-n", namespace, "--timeout=30s")
        assert k8s_cluster.kubectl("get", "epd", "tiny", "-n", namespace, check=False).returncode != 0
        k8s_cluster.kubectl("delete", "namespace", namespace, "--timeout=120s")  # with an EPDDeployment in it
        assert k8s_cluster.kubectl("get", "namespace", namespace, check=False).returncode != 0
    finally:
        operator.start()


class SimulatedTraffic:
    """Feeds the router and decode metrics as a loaded deployment would (this process's registry,
    served at each pod's address by PodMetrics)."""

    def __init__(self) -> None:
        self.tpot, self.kv_usage = 0.5, 0.95
        self._stop = threading.Event()

    def __enter__(self) -> Self:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()

    def _run(self) -> None:
        from epd.workers import metrics

        metrics.IN_FLIGHT.labels("decode").set(0)
        metrics.QUEUE_DEPTH.labels("decode").set(0)
        while not self._stop.is_set():
            metrics.REQUESTS.labels("ok").inc()
            metrics.TTFT.observe(0.2)
            metrics.TPOT.observe(self.tpot)
            metrics.KV_USAGE.set(self.kv_usage)
            self._stop.wait(0.05)  # the pace of the simulated traffic


def test_autoscaler_reads_pod_metrics_and_scales_decode_on_tpot(k8s_cluster, operator, namespace):
    from .pod_metrics import PodMetrics

    manifest = minimal("auto", decode={"replicas": 1, "minReplicas": 1, "maxReplicas": 3, "maxBatch": 4},
                       slo={"ttftSeconds": 2.0, "tpotSeconds": 0.1},
                       autoscaling={"enabled": True, "windowSeconds": 1, "cooldownSeconds": 0})
    k8s_cluster.apply(manifest, namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "auto"), 90, "Ready=True")

    def decode_replicas() -> int:
        return replicas(k8s_cluster, namespace, "statefulset", "auto-decode")

    with PodMetrics(k8s_cluster, namespace, "auto", {"router": 9100, **{s: 9090 for s in STAGES}}), \
            SimulatedTraffic() as traffic:
        # TPOT p90 0.5 s against 0.1 s, KV 95% full: decode grows to its maxReplicas, nothing else moves
        wait_for(lambda: decode_replicas() == 3, 90, "decode scaled up to 3")
        status = epd(k8s_cluster, namespace, "auto")["status"]
        assert status["stages"]["decode"]["scaledReplicas"] == 3 and "TPOT" in status["stages"]["decode"][
            "lastScaleReason"]
        assert replicas(k8s_cluster, namespace, "epdstage", "auto-decode") == 3  # through the scale object
        assert status["observed"]["tpotP90Seconds"] > 0.1
        assert [h["stage"] for h in status["scalingHistory"]] == ["decode"] * len(status["scalingHistory"])
        for stage in ("encode", "prefill"):
            assert replicas(k8s_cluster, namespace, "statefulset", f"auto-{stage}") == 1
        wait_for(lambda: events(k8s_cluster, namespace, "auto", "Scaled"), 30, "a Scaled event")

        # load gone: decode steps back down, one replica at a time, to its minimum
        traffic.tpot, traffic.kv_usage = 0.02, 0.1
        wait_for(lambda: decode_replicas() == 1, 90, "decode scaled back to 1")
        history = epd(k8s_cluster, namespace, "auto")["status"]["scalingHistory"]
        assert [(h["from"], h["to"]) for h in history][-2:] == [(3, 2), (2, 1)]


def test_liveness_and_operator_metrics(k8s_cluster, operator, namespace):
    k8s_cluster.apply(minimal(), namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready")
    assert operator.endpoint("/healthz") == (200, "ok")
    code, text = operator.endpoint("/metrics")
    assert code == 200
    reconciles = sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith('epd_operator_reconciles_total{result="ok"}'))
    assert reconciles >= 1
    assert f'epd_operator_slo_seconds{{epd_deployment="tiny",epd_namespace="{namespace}",target="ttft"}} 2.0' in text
    assert operator.endpoint("/nothing")[0] == 404


def holder(k8s_cluster) -> str | None:
    return k8s_cluster.get("lease", "epd-operator", "-n", SYSTEM)["spec"].get("holderIdentity")


def test_sigterm_exits_zero_and_a_standby_leads_at_once(k8s_cluster, operator):
    leader = holder(k8s_cluster)
    standby = Operator(k8s_cluster, operator.kubeconfig)
    standby.launch()
    try:
        wait_for(lambda: standby.logged("EPD_OPERATOR_WAITING"), 60, "the standby to start")
        assert holder(k8s_cluster) == leader and not standby.logged("EPD_OPERATOR_LEADING")
        assert standby.endpoint("/healthz") == (200, "ok")  # a waiting standby is alive: no restart loop
        assert "epd_operator_leader 0.0" in standby.endpoint("/metrics")[1]
        assert "epd_operator_leader 1.0" in operator.endpoint("/metrics")[1]
        code, _ = operator.stop(deadline=10)  # a clean exit takes a few seconds at most
        assert code == 0, "".join(operator.log[-20:])
        assert operator.logged("released lease")
        wait_for(lambda: standby.logged("EPD_OPERATOR_LEADING"), 3, "the standby to lead within 3 s")
        assert holder(k8s_cluster) not in (None, leader)
    finally:
        code, _ = standby.stop()
        operator.start()
    assert code == 0
