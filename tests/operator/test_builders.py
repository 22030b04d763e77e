"""Pure builders: spec in, Kubernetes objects out."""

from __future__ import annotations

from epd.operator.builders import Owner, build_children, endpoint
from epd.operator.spec import EPDDeploymentSpec
from epd.operator.status import WorkloadState, compute_status

OWNER = Owner("llava", "prod", "uid-1")


def spec(**overrides) -> EPDDeploymentSpec:
    raw = {"model": {"name": "llava-hf/llava-1.5-7b-hf"},
           "encode": {"replicas": 2, "maxBatch": 32, "nodeSelector": {"pool": "enc"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                      "resources": {"limits": {"nvidia.com/gpu": 1}}},
           "decode": {"replicas": 3}, **overrides}
    return EPDDeploymentSpec.from_resource(raw, "epd:1")


def by_key(children: list[dict]) -> dict[str, dict]:
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in children}


def test_children_of_a_managed_redis_deployment():
    children = by_key(build_children(OWNER, spec()))
    assert sorted(children) == sorted([
        "ConfigMap/llava-config", "Service/llava-redis", "StatefulSet/llava-redis",
        *[f"{k}/llava-{s}" for s in ("encode", "prefill", "decode")
          for k in ("Service", "StatefulSet", "PodDisruptionBudget")],
        "Service/llava", "Deployment/llava-router"])
    for child in children.values():
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert child["metadata"]["namespace"] == "prod"


def test_stage_pod_template():
    encode = by_key(build_children(OWNER, spec()))["StatefulSet/llava-encode"]
    pod = encode["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert encode["spec"]["replicas"] == 2 and encode["spec"]["serviceName"] == "llava-encode"
    assert container["command"][:6] == ["epd", "worker", "--role", "encode", "--model", "llava-hf/llava-1.5-7b-hf"]
    assert container["command"][-2:] == ["--encode-max-batch", "32"]
    assert "$(POD_NAME).llava-encode.prod.svc:50051" in container["command"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert pod["nodeSelector"] == {"pool": "enc"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert {"name": "EPD_REDIS_URL", "value": "redis://llava-redis.prod.svc:6379/0"} in container["env"]


def test_external_redis_and_model_volume():
    children = by_key(build_children(OWNER, spec(model={"name": "llava-7b", "pvc": "weights", "secret": "hf"},
                                                 cache={"redis": {"urlSecret": "redis-url"}})))
    assert "StatefulSet/llava-redis" not in children
    container = children["StatefulSet/llava-prefill"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][5] == "/models/llava-7b"
    assert {"secretRef": {"name": "hf"}} in container["envFrom"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert spec(cache={"redis": {"urlSecret": "redis-url"}}).secrets() == ["redis-url"]


def test_status_conditions():
    stages = {"encode": WorkloadState(2, 2, 2, 2), "prefill": WorkloadState(1, 1, 0, 1),
              "decode": WorkloadState(3, 3, 3, 3)}
    status = compute_status(4, stages, WorkloadState(1, 1, 1, 1), endpoint(OWNER, spec()), {})
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False" and "prefill" in conditions["Ready"]["message"]
    assert conditions["PrefillReady"]["status"] == "False" and conditions["EncodeReady"]["status"] == "True"
    assert conditions["Progressing"]["status"] == "True" and conditions["Degraded"]["status"] == "False"
    assert status["observedGeneration"] == 4 and status["stages"]["prefill"]["summary"] == "0/1"
    again = compute_status(4, stages, WorkloadState(1, 1, 1, 1), "x", status)
    assert {c["type"]: c["lastTransitionTime"] for c in again["conditions"]} == \
        {c["type"]: c["lastTransitionTime"] for c in status["conditions"]}
    degraded = compute_status(5, stages, WorkloadState(1, 1, 1, 1), "x", status, "SecretNotFound", "no secret")
    assert {c["type"]: c["reason"] for c in degraded["conditions"]}["Degraded"] == "SecretNotFound"
    assert "AutoscalingActive" not in {c["type"] for c in degraded["conditions"]}
    requested = compute_status(5, stages, WorkloadState(1, 1, 1, 1), "x", status,
                               autoscaling=spec(autoscaling={"enabled": True}).autoscaling.enabled)
    scaling = next(c for c in requested["conditions"] if c["type"] == "AutoscalingActive")
    assert (scaling["status"], scaling["reason"]) == ("True", "Enabled")


def test_prefill_gets_its_prefix_cache_size_and_only_prefill():
    children = by_key(build_children(OWNER, spec(cache={"redis": {"managed": True}, "prefixCacheBytes": 0})))
    commands = {stage: children[f"StatefulSet/llava-{stage}"]["spec"]["template"]["spec"]["containers"][0]["command"]
                for stage in ("encode", "prefill", "decode")}
    flag = commands["prefill"].index("--prefix-cache-bytes")
    assert commands["prefill"][flag + 1] == "0"
    assert "--prefix-cache-bytes" not in commands["encode"] and "--prefix-cache-bytes" not in commands["decode"]
