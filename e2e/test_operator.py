"""The operator against a real kube-apiserver: installed with Helm, run with
the chart's ServiceAccount token, reconciling the examples onto kwok GPU pools."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from .controlplane import ControlPlane, wait_for

pytestmark = pytest.mark.controlplane
ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "epd-system"
STAGES = ("encode", "prefill", "decode")


class Operator:
    """`epd operator` as a real process, authenticated as the chart's ServiceAccount."""

    def __init__(self, plane: ControlPlane, kubeconfig: Path) -> None:
        self.plane = plane
        self.kubeconfig = kubeconfig
        self.process: subprocess.Popen | None = None
        self.log: list[str] = []

    def start(self) -> None:
        leading = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "epd.cli", "operator", "--kubeconfig", str(self.kubeconfig),
             "--lease-namespace", SYSTEM, "--drift-interval", "3", "--autoscale-interval", "0.5",
             "--image", "epd-serve:test"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def read() -> None:
            for line in self.process.stdout:
                self.log.append(line)
                if "EPD_OPERATOR_LEADING" in line:
                    leading.set()

        threading.Thread(target=read, daemon=True).start()
        wait_for(lambda: leading.is_set() or self.process.poll() is not None, 60, "the operator to lead")
        assert leading.is_set(), "".join(self.log[-30:])

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired as exc:
                self.process.kill()
                self.process.wait()
                raise AssertionError("the operator ignored SIGTERM:\n" + "".join(self.log[-20:])) from exc


@pytest.fixture(scope="module")
def operator(k8s_cluster: ControlPlane, gpu_pools, tmp_path_factory):
    k8s_cluster.kubectl("create", "namespace", SYSTEM)
    k8s_cluster.add_fake_node("cpu-0", {"epd.dev/pool": "cpu"})  # untainted: routers, Redis, untargeted stages
    k8s_cluster.helm("install", "epd", str(ROOT / "helm" / "epd-serve"), "--namespace", SYSTEM,
                     "--set", "operator.replicas=0", "--wait", "--timeout", "60s")
    wait_for(lambda: k8s_cluster.kubectl("get", "crd", "epddeployments.serving.epd.dev", check=False).returncode == 0,
             30, "the CRD")
    kubeconfig = k8s_cluster.service_account_kubeconfig(SYSTEM, "epd-epd-serve",
                                                        tmp_path_factory.mktemp("sa") / "operator.kubeconfig")
    op = Operator(k8s_cluster, kubeconfig)
    op.start()
    yield op
    op.stop()


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def epd(plane: ControlPlane, namespace: str, name: str) -> dict:
    return plane.get("epddeployment", name, "-n", namespace)


def condition(obj: dict, kind: str) -> str | None:
    return next((c["status"] for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def children(plane: ControlPlane, namespace: str, instance: str) -> dict[str, dict]:
    found = {}
    for kind in ("statefulsets", "deployments", "services", "configmaps", "poddisruptionbudgets"):
        for item in plane.get(kind, "-n", namespace, "-l", f"app.kubernetes.io/instance={instance}")["items"]:
            found[f"{item['kind']}/{item['metadata']['name']}"] = item
    return found


def test_chart_lints_and_renders(k8s_cluster):
    chart = str(ROOT / "helm" / "epd-serve")
    assert k8s_cluster.helm("lint", chart).returncode == 0
    rendered = list(yaml.safe_load_all(k8s_cluster.helm("template", "x", chart).stdout))
    kinds = sorted(doc["kind"] for doc in rendered if doc)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "ServiceAccount"]
    typo = k8s_cluster.helm("template", "x", chart, "--set", "operatr.replicas=2", check=False)
    assert typo.returncode != 0 and "operatr" in typo.stderr


def test_operator_rbac_refuses_what_it_does_not_need(k8s_cluster, operator):
    for verb, resource in (("delete", "statefulsets"), ("get", "pods"), ("create", "secrets"), ("delete", "epd")):
        answer = k8s_cluster.kubectl("auth", "can-i", verb, resource, "-n", "default",
                                     kubeconfig=operator.kubeconfig, check=False)
        assert answer.stdout.strip() == "no", (verb, resource)
    refused = k8s_cluster.kubectl("delete", "statefulset", "anything", "-n", "default",
                                  kubeconfig=operator.kubeconfig, check=False)
    assert "forbidden" in refused.stderr


def test_minimal_example_creates_every_child(k8s_cluster, operator, namespace):
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "minimal.yaml"))
    wait_for(lambda: len(children(k8s_cluster, namespace, "tiny")) == 14, 60, "14 children")
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
        assert container["readinessProbe"]["grpc"]["port"] == 50051
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert found[f"Service/tiny-{stage}"]["spec"]["clusterIP"] == "None"
    assert found["Deployment/tiny-router"]["spec"]["template"]["spec"]["containers"][0]["command"][:2] == \
        ["epd", "router"]
    assert "StatefulSet/tiny-redis" in found
    obj = wait_for(lambda: (o := epd(k8s_cluster, namespace, "tiny")).get("status", {}).get("observedGeneration")
                   == o["metadata"]["generation"] and o, 30, "observedGeneration")
    assert obj["status"]["endpoint"] == f"http://tiny.{namespace}.svc:8000/v1"
    table = k8s_cluster.kubectl("get", "epd", "-n", namespace).stdout.split("\n")[0].split()
    assert table == ["NAME", "READY", "ENCODE", "PREFILL", "DECODE", "TTFT-P90", "AGE"]
    events = wait_for(lambda: [e for e in k8s_cluster.get("events", "-n", namespace)["items"]
                               if e["involvedObject"]["kind"] == "EPDDeployment" and e["reason"] == "Reconciled"],
                      30, "a Reconciled event")
    # The create reconcile applies every child in one pass, so its one event names them.
    assert len(events) == 1 and events[0]["message"].startswith("applied 14 objects: ConfigMap/tiny-config"), events


def full_example(gpu_pools: dict[str, str]) -> dict:
    manifest = example("full.yaml")
    manifest["spec"]["model"]["name"] = "tiny-llava"
    manifest["spec"]["router"]["replicas"] = 1
    for stage in STAGES:
        assert manifest["spec"][stage]["nodeSelector"] == {"epd.dev/pool": gpu_pools[stage]}
    return manifest


def test_full_example_lands_on_three_pools_becomes_ready_and_scales(k8s_cluster, operator, namespace, gpu_pools):
    k8s_cluster.kubectl("create", "secret", "generic", "redis-credentials", "-n", namespace,
                        "--from-literal=url=redis://redis.example:6379/0")
    k8s_cluster.apply(full_example(gpu_pools), namespace=namespace)
    ready = wait_for(lambda: condition(o := epd(k8s_cluster, namespace, "llava-7b"), "Ready") == "True" and o,
                     90, "Ready=True")
    assert {s: ready["status"]["stages"][s]["summary"] for s in STAGES} == \
        {"encode": "2/2", "prefill": "1/1", "decode": "2/2"}
    for stage in STAGES:
        pods = k8s_cluster.get("pods", "-n", namespace, "-l", f"serving.epd.dev/stage={stage}")["items"]
        nodes = {p["spec"]["nodeName"] for p in pods}
        assert nodes and all(n.startswith(gpu_pools[stage]) for n in nodes), (stage, nodes)
        env = pods[0]["spec"]["containers"][0]["env"]
        assert {"name": "EPD_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "redis-credentials", "key": "url"}}} in env
    assert not k8s_cluster.get("statefulsets", "-n", namespace, "-l", "app.kubernetes.io/component=redis")["items"]

    k8s_cluster.kubectl("patch", "epd", "llava-7b", "-n", namespace, "--type", "merge",
                        "-p", '{"spec": {"decode": {"replicas": 4}}}')
    wait_for(lambda: k8s_cluster.get("statefulset", "llava-7b-decode", "-n", namespace)["spec"]["replicas"] == 4,
             30, "decode StatefulSet at 4")
    wait_for(lambda: epd(k8s_cluster, namespace, "llava-7b")["status"]["stages"]["decode"]["summary"] == "4/4",
             60, "status decode 4/4")


def test_drift_is_corrected(k8s_cluster, operator, namespace):
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "minimal.yaml"))
    wait_for(lambda: len(children(k8s_cluster, namespace, "tiny")) == 14, 60, "children")
    k8s_cluster.kubectl("delete", "service", "tiny-prefill", "-n", namespace)
    wait_for(lambda: "Service/tiny-prefill" in children(k8s_cluster, namespace, "tiny"), 30, "the Service back")
    k8s_cluster.kubectl("patch", "statefulset", "tiny-encode", "-n", namespace, "--type", "json", "-p",
                        '[{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:1"},'
                        ' {"op": "replace", "path": "/spec/replicas", "value": 5}]')

    def restored() -> bool:
        sts = k8s_cluster.get("statefulset", "tiny-encode", "-n", namespace)
        return sts["spec"]["replicas"] == 1 and sts["spec"]["template"]["spec"]["containers"][0]["image"] == \
            "epd-serve:test"

    wait_for(restored, 30, "image and replicas restored")


def test_validation_refuses_bad_specs(k8s_cluster, operator, namespace):
    base = example("minimal.yaml")
    cases = {
        "negative replicas": ({"encode": {"replicas": -1}}, "spec.encode.replicas"),
        "min > max": ({"decode": {"replicas": 2, "minReplicas": 3, "maxReplicas": 2}}, "minReplicas must be <="),
        "zero SLO": ({"slo": {"ttftSeconds": 0}}, "spec.slo.ttftSeconds"),
        "redis given two ways": ({"cache": {"redis": {"managed": True, "urlSecret": "x"}}}, "exactly one way"),
        "unknown field": ({"encode": {"replicas": 1, "gpus": 2}}, 'unknown field "spec.encode.gpus"'),
    }
    for name, (patch, message) in cases.items():
        manifest = copy.deepcopy(base)
        manifest["metadata"]["name"] = "bad"
        manifest["spec"].update(patch)
        result = k8s_cluster.apply(manifest, namespace=namespace, check=False)
        assert result.returncode != 0 and message in result.stderr, (name, result.stderr)


def test_missing_secret_is_degraded_not_a_crash(k8s_cluster, operator, namespace):
    manifest = example("minimal.yaml")
    manifest["spec"]["cache"] = {"redis": {"urlSecret": "does-not-exist"}}
    k8s_cluster.apply(manifest, namespace=namespace)
    obj = wait_for(lambda: condition(o := epd(k8s_cluster, namespace, "tiny"), "Degraded") == "True" and o,
                   30, "Degraded=True")
    degraded = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "SecretNotFound" and "does-not-exist" in degraded["message"]
    assert operator.process.poll() is None
    k8s_cluster.kubectl("create", "secret", "generic", "does-not-exist", "-n", namespace, "--from-literal=url=redis://r:6379")
    wait_for(lambda: condition(epd(k8s_cluster, namespace, "tiny"), "Degraded") == "False", 30, "Degraded=False")


def test_restart_changes_nothing_and_delete_removes_everything(k8s_cluster, operator, namespace):
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "minimal.yaml"))
    wait_for(lambda: len(children(k8s_cluster, namespace, "tiny")) == 14, 60, "children")
    wait_for(lambda: condition(epd(k8s_cluster, namespace, "tiny"), "Ready") == "True", 60, "Ready")
    before = {k: v["metadata"]["resourceVersion"] for k, v in children(k8s_cluster, namespace, "tiny").items()}
    operator.stop()
    operator.start()
    generation = epd(k8s_cluster, namespace, "tiny")["metadata"]["generation"]
    k8s_cluster.kubectl("annotate", "epd", "tiny", "-n", namespace, "touched=yes")  # an event after the restart
    wait_for(lambda: any("EPD_OPERATOR_LEADING" in line for line in operator.log), 30, "the restarted operator")
    after = {k: v["metadata"]["resourceVersion"] for k, v in children(k8s_cluster, namespace, "tiny").items()}
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k.startswith(("StatefulSet", "Service", "ConfigMap"))} == \
        {k: v for k, v in before.items() if k.startswith(("StatefulSet", "Service", "ConfigMap"))}
    assert epd(k8s_cluster, namespace, "tiny")["metadata"]["generation"] == generation
    k8s_cluster.kubectl("delete", "epd", "tiny", "-n", namespace)
    wait_for(lambda: not children(k8s_cluster, namespace, "tiny"), 60, "garbage collection of every child")


class SimulatedTraffic:
    """Feeds the router and decode metrics as a loaded deployment would (this process's registry,
    served at each pod's address by PodMetrics)."""

    def __init__(self) -> None:
        self.tpot, self.kv_usage = 0.5, 0.95
        self._stop = threading.Event()

    def __enter__(self) -> "SimulatedTraffic":
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

    manifest = {"apiVersion": "serving.epd.dev/v1alpha1", "kind": "EPDDeployment", "metadata": {"name": "auto"},
                "spec": {"model": {"name": "tiny-llava"},
                         "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3, "maxBatch": 4},
                         "slo": {"ttftSeconds": 2.0, "tpotSeconds": 0.1},
                         "autoscaling": {"enabled": True, "windowSeconds": 1, "cooldownSeconds": 0}}}
    k8s_cluster.apply(manifest, namespace=namespace)
    wait_for(lambda: condition(epd(k8s_cluster, namespace, "auto"), "Ready") == "True", 90, "Ready=True")

    def decode_replicas() -> int:
        return k8s_cluster.get("statefulset", "auto-decode", "-n", namespace)["spec"]["replicas"]

    with PodMetrics(k8s_cluster, namespace, "auto", {"router": 8000, **{s: 9090 for s in STAGES}}), \
            SimulatedTraffic() as traffic:
        # TPOT p90 0.5 s against 0.1 s, KV 95% full: decode grows to its maxReplicas, nothing else moves
        wait_for(lambda: decode_replicas() == 3, 90, "decode scaled up to 3")
        status = epd(k8s_cluster, namespace, "auto")["status"]
        assert status["stages"]["decode"]["scaledReplicas"] == 3 and "TPOT" in status["stages"]["decode"][
            "lastScaleReason"]
        assert status["observed"]["tpotP90Seconds"] > 0.1
        assert [h["stage"] for h in status["scalingHistory"]] == ["decode"] * len(status["scalingHistory"])
        for stage in ("encode", "prefill"):
            assert k8s_cluster.get("statefulset", f"auto-{stage}", "-n", namespace)["spec"]["replicas"] == 1
        wait_for(lambda: [e for e in k8s_cluster.get("events", "-n", namespace)["items"]
                          if e["reason"] == "Scaled" and e["involvedObject"]["name"] == "auto"], 30, "a Scaled event")
        # the handlers' own logs (a timer succeeding every half second) are not posted as Events
        assert not [e for e in k8s_cluster.get("events", "-n", namespace)["items"] if e["reason"] == "Logging"]

        # load gone: decode steps back down, one replica at a time, to its minimum
        traffic.tpot, traffic.kv_usage = 0.02, 0.1
        wait_for(lambda: decode_replicas() == 1, 90, "decode scaled back to 1")
        history = epd(k8s_cluster, namespace, "auto")["status"]["scalingHistory"]
        assert [(h["from"], h["to"]) for h in history][-2:] == [(3, 2), (2, 1)]


def test_a_second_replica_waits_for_the_lease_then_takes_over(k8s_cluster, operator):
    def holder() -> str:
        return k8s_cluster.get("lease", "epd-operator", "-n", SYSTEM)["spec"]["holderIdentity"]

    leader = holder()
    standby = Operator(k8s_cluster, operator.kubeconfig)
    standby.process = subprocess.Popen(
        [sys.executable, "-P", "-m", "epd.cli", "operator", "--kubeconfig", str(operator.kubeconfig),
         "--lease-namespace", SYSTEM, "--image", "epd-serve:test"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=lambda: standby.log.extend(standby.process.stdout), daemon=True).start()
    try:
        wait_for(lambda: any("EPD_OPERATOR_WAITING" in line for line in standby.log), 30, "the standby to start")
        assert holder() == leader
        operator.stop()
        wait_for(lambda: any("EPD_OPERATOR_LEADING" in line for line in standby.log), 60, "failover")
        assert holder() != leader
    finally:
        standby.stop()
