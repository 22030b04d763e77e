"""Pure builders: spec in, Kubernetes objects out."""

from __future__ import annotations

from epd.operator.builders import PRUNABLE, Facts, build_children, endpoint
from epd.operator.naming import Owner
from epd.operator.spec import EPDDeploymentSpec
from epd.operator.status import WorkloadState, compute_status
from epd.stages import STAGES

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


def pod(children: dict, kind_name: str) -> dict:
    return children[kind_name]["spec"]["template"]["spec"]


def test_children_of_a_managed_redis_deployment():
    children = by_key(build_children(OWNER, spec()))
    assert sorted(children) == sorted([
        "ConfigMap/llava-config", "Service/llava-redis", "StatefulSet/llava-redis", "NetworkPolicy/llava-redis",
        *[f"{k}/llava-{s}" for s in STAGES
          for k in ("EPDStage", "Service", "StatefulSet", "PodDisruptionBudget", "NetworkPolicy")],
        "Service/llava", "Deployment/llava-router", "NetworkPolicy/llava-router"])
    for child in children.values():
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "serving.epd.dev/v1alpha1", "kind": "EPDDeployment", "name": "llava", "uid": "uid-1",
            "controller": True}]  # no blockOwnerDeletion: no need for rights on the owner's finalizers
        assert child["metadata"]["namespace"] == "prod"


def test_stage_pod_template():
    children = by_key(build_children(OWNER, spec(), Facts(replicas={"encode": 5})))
    encode = children["StatefulSet/llava-encode"]
    container = pod(children, "StatefulSet/llava-encode")["containers"][0]
    assert encode["spec"]["replicas"] == 5 and encode["spec"]["serviceName"] == "llava-encode"  # the EPDStage's
    assert children["StatefulSet/llava-decode"]["spec"]["replicas"] == 3  # no EPDStage yet: the spec's
    assert container["command"] == [
        "epd", "worker", "--role", "encode", "--model", "llava-hf/llava-1.5-7b-hf", "--host", "0.0.0.0",
        "--port", "50051", "--metrics-port", "9090", "--health-port", "50052",
        "--advertise", "$(POD_NAME).llava-encode.prod.svc:50051", "--cache-bytes", str(1 << 30),
        "--cache-ttl", "3600", "--drain-timeout", "25", "--encode-max-batch", "32",
        "--tls-cert", "/etc/epd/tls/tls.crt", "--tls-key", "/etc/epd/tls/tls.key", "--tls-ca", "/etc/epd/tls/ca.crt"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    spec_ = pod(children, "StatefulSet/llava-encode")
    assert spec_["nodeSelector"] == {"pool": "enc"} and spec_["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["readinessProbe"]["grpc"]["port"] == 50052  # the plaintext health port: no client cert
    assert {"name": "EPD_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "llava-redis-auth", "key": "url"}}} \
        in container["env"]
    assert "--redis-url" not in container["command"]  # the password stays out of the process list
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    decode = pod(children, "StatefulSet/llava-decode")["containers"][0]
    assert {"name": "kv-tcp", "containerPort": 50053} in decode["ports"]  # prefill writes KV there
    assert all(port["name"] != "kv-tcp" for port in container["ports"])


def test_every_pod_passes_pod_security_restricted():
    children = build_children(OWNER, spec())
    workloads = [c for c in children if c["kind"] in ("StatefulSet", "Deployment")]
    assert len(workloads) == 5
    for workload in workloads:
        pod_spec = workload["spec"]["template"]["spec"]
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_spec["automountServiceAccountToken"] is False
        for container in pod_spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True and context["runAsNonRoot"] is True
            assert context["runAsUser"] > 0
        assert not any("hostPath" in volume for volume in pod_spec["volumes"])


def test_each_stage_has_its_own_grace_period_and_drains_inside_it():
    children = by_key(build_children(OWNER, spec(decode={"replicas": 1, "terminationGracePeriodSeconds": 900})))
    graces = {stage: pod(children, f"StatefulSet/llava-{stage}")["terminationGracePeriodSeconds"] for stage in STAGES}
    assert graces == {"encode": 30, "prefill": 60, "decode": 900}
    decode = pod(children, "StatefulSet/llava-decode")["containers"][0]["command"]
    assert decode[decode.index("--drain-timeout") + 1] == "895"
    assert pod(children, "Deployment/llava-router")["terminationGracePeriodSeconds"] == 60


def test_model_delivery_downloads_into_a_cache_unless_a_pvc_holds_the_model():
    downloads = by_key(build_children(OWNER, spec()))
    container = pod(downloads, "StatefulSet/llava-prefill")["containers"][0]
    assert {"name": "EPD_MODEL_DOWNLOAD", "value": "1"} in container["env"]
    assert {"name": "HF_HUB_CACHE", "value": "/var/cache/epd/hub"} in container["env"]
    assert {"name": "model-cache", "emptyDir": {}} in pod(downloads, "StatefulSet/llava-prefill")["volumes"]
    assert container["startupProbe"]["failureThreshold"] == 360  # a 7B download fits in the startup budget

    shared = by_key(build_children(OWNER, spec(model={"name": "m/x", "cache": {"pvc": "hf-cache"}})))
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in \
        pod(shared, "StatefulSet/llava-encode")["volumes"]

    per_pod = by_key(build_children(OWNER, spec(model={"name": "m/x", "cache": {"storage": "40Gi",
                                                                                "storageClassName": "local"}})))
    encode = per_pod["StatefulSet/llava-encode"]
    assert encode["spec"]["volumeClaimTemplates"] == [{"metadata": {"name": "model-cache"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "40Gi"}},
        "storageClassName": "local"}}]
    assert not [v for v in encode["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-cache"]
    assert {"name": "model-cache", "emptyDir": {}} in pod(per_pod, "Deployment/llava-router")["volumes"]

    on_pvc = by_key(build_children(OWNER, spec(model={"name": "llava-7b", "pvc": "weights", "secret": "hf"},
                                               cache={"redis": {"urlSecret": "redis-url"}})))
    container = pod(on_pvc, "StatefulSet/llava-prefill")["containers"][0]
    assert container["command"][5] == "/models/llava-7b"
    assert not [e for e in container["env"] if e["name"] == "EPD_MODEL_DOWNLOAD"]
    assert {"secretRef": {"name": "hf"}} in container["envFrom"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]


def test_external_redis_takes_url_password_and_ca_from_its_secret():
    children = by_key(build_children(OWNER, spec(cache={"redis": {"urlSecret": "redis-url"}})))
    assert not {"StatefulSet/llava-redis", "NetworkPolicy/llava-redis"} & set(children)
    pod_spec = pod(children, "Deployment/llava-router")
    container = pod_spec["containers"][0]
    assert {"name": "EPD_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "redis-url", "key": "url"}}} \
        in container["env"]
    assert {"name": "redis-tls", "secret": {"secretName": "redis-url", "optional": True,
                                            "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in pod_spec["volumes"]
    assert spec(cache={"redis": {"urlSecret": "redis-url"}}, router={"apiKeySecret": "keys"}).secrets() == \
        ["redis-url", "keys"]


def test_managed_redis_requires_its_generated_password():
    from epd.operator import redis

    secret = redis.auth_secret(OWNER)
    password = secret["stringData"]["password"]
    assert len(password) >= 32 and secret["stringData"]["url"] == f"redis://:{password}@llava-redis.prod.svc:6379/0"
    assert redis.auth_secret(OWNER)["stringData"]["password"] != password  # generated, never a constant
    redis_pod = pod(by_key(build_children(OWNER, spec())), "StatefulSet/llava-redis")
    container = redis_pod["containers"][0]
    assert container["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert container["env"] == [{"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
        "name": "llava-redis-auth", "key": "password"}}}]


def test_router_command_keys_and_metrics_port():
    children = by_key(build_children(OWNER, spec(router={"apiKeySecret": "keys", "metricsPort": 9200},
                                                 grpcReflection=True, tls={"enabled": False})))
    container = pod(children, "Deployment/llava-router")["containers"][0]
    assert container["command"] == ["epd", "router", "--host", "0.0.0.0", "--port", "8000", "--metrics-port", "9200",
                                    "--model", "llava-hf/llava-1.5-7b-hf",
                                    "--served-model-name", "llava-hf/llava-1.5-7b-hf"]
    assert {"name": "EPD_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-keys"}}} \
        in container["env"]
    assert {"name": "metrics", "containerPort": 9200} in container["ports"]
    worker = pod(children, "StatefulSet/llava-decode")["containers"][0]["command"]
    assert "--grpc-reflection" in worker and "--tls-cert" not in worker
    assert not [v for v in pod(children, "StatefulSet/llava-decode")["volumes"] if v["name"] == "tls"]


def test_cert_manager_provider_builds_a_certificate_chain():
    children = by_key(build_children(OWNER, spec(), Facts(tls_provider="cert-manager")))
    assert {"Issuer/llava-selfsigned", "Certificate/llava-ca", "Issuer/llava-ca", "Certificate/llava-tls"} <= \
        set(children)
    leaf = children["Certificate/llava-tls"]["spec"]
    assert leaf["secretName"] == "llava-tls" and leaf["issuerRef"]["name"] == "llava-ca"
    assert "*.llava-encode.prod.svc" in leaf["dnsNames"] and "client auth" in leaf["usages"]
    own = by_key(build_children(OWNER, spec(tls={"issuerRef": {"name": "corp", "kind": "ClusterIssuer"}}),
                                Facts(tls_provider="cert-manager")))
    assert [k for k in own if k.startswith(("Issuer/", "Certificate/"))] == ["Certificate/llava-tls"]
    assert own["Certificate/llava-tls"]["spec"]["issuerRef"] == {"name": "corp", "kind": "ClusterIssuer",
                                                                 "group": "cert-manager.io"}


def kinds_built(**overrides) -> set[tuple[str, str]]:
    return {(c["apiVersion"], c["kind"]) for c in build_children(OWNER, spec(**overrides),
                                                                  Facts(tls_provider="cert-manager"))}


def test_prunable_kinds_are_exactly_those_a_spec_change_can_drop():
    variants = [{}, {"cache": {"redis": {"urlSecret": "r"}}}, {"networkPolicy": {"enabled": False}},
                {"tls": {"enabled": False}}, {"tls": {"issuerRef": {"name": "x"}}}]
    built = [kinds_built(**v) for v in variants]
    everything = set().union(*built)
    always = set.intersection(*built)
    # a kind is prunable when some spec builds fewer of its objects than another
    counts = [{kind: sum(1 for c in build_children(OWNER, spec(**v), Facts(tls_provider="cert-manager"))
                         if (c["apiVersion"], c["kind"]) == kind) for kind in everything} for v in variants]
    varying = {kind for kind in everything if len({count[kind] for count in counts}) > 1}
    assert varying == set(PRUNABLE)
    assert ("apps/v1", "Deployment") in always - varying  # the router is never pruned: no delete right needed


def test_status_conditions():
    stages = {"encode": WorkloadState(2, 2, 2, 2), "prefill": WorkloadState(1, 1, 0, 1),
              "decode": WorkloadState(3, 3, 3, 3)}
    status = compute_status(4, stages, WorkloadState(1, 1, 1, 1), endpoint(OWNER, spec()), {},
                            problems={"prefill": "pod llava-prefill-0: CrashLoopBackOff: out of memory"})
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False" and "prefill" in conditions["Ready"]["message"]
    assert (conditions["PrefillReady"]["status"], conditions["PrefillReady"]["reason"]) == ("False", "PodsFailing")
    assert conditions["PrefillReady"]["message"] == \
        "0/1 prefill workers ready; pod llava-prefill-0: CrashLoopBackOff: out of memory"
    assert conditions["EncodeReady"]["status"] == "True"
    assert conditions["Progressing"]["status"] == "True" and conditions["Degraded"]["status"] == "False"
    assert status["observedGeneration"] == 4 and status["stages"]["prefill"]["summary"] == "0/1"
    again = compute_status(4, stages, WorkloadState(1, 1, 1, 1), "x", status)
    assert {c["type"]: c["lastTransitionTime"] for c in again["conditions"]} == \
        {c["type"]: c["lastTransitionTime"] for c in status["conditions"]}
    degraded = compute_status(5, stages, WorkloadState(1, 1, 1, 1), "x", status, "ApplyFailed",
                              "StatefulSet/llava-encode: forbidden")
    assert {c["type"]: c["reason"] for c in degraded["conditions"]}["Degraded"] == "ApplyFailed"
    assert "AutoscalingActive" not in {c["type"] for c in degraded["conditions"]}


def test_prefill_gets_its_prefix_cache_size_and_only_prefill():
    children = by_key(build_children(OWNER, spec(cache={"redis": {"managed": True}, "prefixCacheBytes": 0})))
    commands = {stage: pod(children, f"StatefulSet/llava-{stage}")["containers"][0]["command"] for stage in STAGES}
    flag = commands["prefill"].index("--prefix-cache-bytes")
    assert commands["prefill"][flag + 1] == "0"
    assert "--prefix-cache-bytes" not in commands["encode"] and "--prefix-cache-bytes" not in commands["decode"]
