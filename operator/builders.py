"""Pure builders: an EPDDeployment's spec in, the Kubernetes objects that
realise it out (plain dicts, ready for server-side apply). No cluster calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .crd import GROUP, KIND, VERSION
from .spec import STAGES, EPDDeploymentSpec

GRPC_PORT = 50051
METRICS_PORT = 9090
REDIS_PORT = 6379
STAGE_LABEL = f"{GROUP}/stage"
MANAGED_BY = "epd-operator"
BATCH_FLAG = {"encode": "--encode-max-batch", "prefill": "--prefill-token-budget", "decode": "--decode-max-batch"}


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str

    def reference(self) -> dict:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def labels(owner: Owner, component: str) -> dict[str, str]:
    base = {"app.kubernetes.io/name": "epd-serve", "app.kubernetes.io/instance": owner.name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": MANAGED_BY}
    if component in STAGES:
        base[STAGE_LABEL] = component
    return base


def selector(owner: Owner, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": owner.name, "app.kubernetes.io/component": component}


def _meta(owner: Owner, name: str, component: str) -> dict:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner, component),
            "ownerReferences": [owner.reference()]}


def child_name(owner: Owner, component: str) -> str:
    return f"{owner.name}-{component}"


def redis_url_env(owner: Owner, spec: EPDDeploymentSpec) -> dict:
    if spec.cache.managed_redis:
        return {"name": "EPD_REDIS_URL",
                "value": f"redis://{child_name(owner, 'redis')}.{owner.namespace}.svc:{REDIS_PORT}/0"}
    return {"name": "EPD_REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": spec.cache.redis_url_secret, "key": "url"}}}


SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _container(owner: Owner, spec: EPDDeploymentSpec, name: str, command: list[str], extra_env: list[dict],
               resources: dict, ports: list[dict]) -> dict:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "EPD_MODEL_CACHE", "value": "/tmp/epd-models"},
           redis_url_env(owner, spec), *extra_env]
    env_from = [{"configMapRef": {"name": child_name(owner, "config")}}]
    if spec.model.secret:
        env_from.append({"secretRef": {"name": spec.model.secret}})
    mounts = [{"name": "scratch", "mountPath": "/tmp"}]
    if spec.model.pvc:
        mounts.append({"name": "model", "mountPath": "/models", "readOnly": True})
    return {"name": name, "image": spec.image, "imagePullPolicy": "IfNotPresent", "command": command, "env": env,
            "envFrom": env_from, "ports": ports, "resources": resources, "securityContext": SECURITY_CONTEXT,
            "volumeMounts": mounts}


def _volumes(spec: EPDDeploymentSpec) -> list[dict]:
    volumes = [{"name": "scratch", "emptyDir": {}}]
    if spec.model.pvc:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model.pvc, "readOnly": True}})
    return volumes


def model_argument(spec: EPDDeploymentSpec) -> str:
    """With a weights PVC the name is a directory inside it; otherwise a hub id or preset."""
    return f"/models/{spec.model.name.lstrip('/')}" if spec.model.pvc else spec.model.name


def stage_statefulset(owner: Owner, spec: EPDDeploymentSpec, stage: str) -> dict:
    stage_spec = spec.stages[stage]
    service = child_name(owner, stage)
    command = ["epd", "worker", "--role", stage, "--model", model_argument(spec), "--redis-url", "$(EPD_REDIS_URL)",
               "--host", "0.0.0.0", "--port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT),
               "--advertise", f"$(POD_NAME).{service}.{owner.namespace}.svc:{GRPC_PORT}",
               "--cache-bytes", str(spec.cache.cache_bytes), "--cache-ttl", str(spec.cache.ttl_seconds)]
    if stage == "prefill":
        command += ["--prefix-cache-bytes", str(spec.cache.prefix_cache_bytes)]
    if stage_spec.max_batch:
        command += [BATCH_FLAG[stage], str(stage_spec.max_batch)]
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}, *stage_spec.env]
    container = _container(owner, spec, "worker", command, env, stage_spec.resources,
                           [{"name": "grpc", "containerPort": GRPC_PORT},
                            {"name": "metrics", "containerPort": METRICS_PORT}])
    probe = {"grpc": {"port": GRPC_PORT}, "periodSeconds": 10, "failureThreshold": 3}
    container["readinessProbe"] = probe
    container["livenessProbe"] = {**probe, "initialDelaySeconds": 30, "failureThreshold": 6}
    container["startupProbe"] = {**probe, "failureThreshold": 90}  # model loading can take minutes
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": _volumes(spec),
                                "securityContext": {"runAsNonRoot": True, "fsGroup": 10001},
                                "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 30}
    if stage_spec.node_selector:
        pod_spec["nodeSelector"] = stage_spec.node_selector
    if stage_spec.tolerations:
        pod_spec["tolerations"] = stage_spec.tolerations
    if stage_spec.affinity:
        pod_spec["affinity"] = stage_spec.affinity
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(owner, service, stage),
            "spec": {"replicas": stage_spec.replicas, "serviceName": service, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": selector(owner, stage)},
                     "template": {"metadata": {"labels": labels(owner, stage),
                                               "annotations": {"prometheus.io/scrape": "true",
                                                               "prometheus.io/port": str(METRICS_PORT)}},
                                  "spec": pod_spec}}}


def stage_service(owner: Owner, stage: str) -> dict:
    """Headless: every worker gets a stable DNS name that cache metadata can point at."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, child_name(owner, stage), stage),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector(owner, stage),
                     "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc"},
                               {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]}}


def disruption_budget(owner: Owner, component: str) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(owner, child_name(owner, component), component),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(owner, component)}}}


def router_deployment(owner: Owner, spec: EPDDeploymentSpec) -> dict:
    port = spec.router.port
    command = ["epd", "router", "--host", "0.0.0.0", "--port", str(port), "--model", model_argument(spec),
               "--served-model-name", spec.model.name, "--redis-url", "$(EPD_REDIS_URL)"]
    container = _container(owner, spec, "router", command, [], {"requests": {"cpu": "500m", "memory": "1Gi"}},
                           [{"name": "http", "containerPort": port}])
    container["readinessProbe"] = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}
    container["livenessProbe"] = {"httpGet": {"path": "/v1/models", "port": "http"}, "periodSeconds": 10,
                                  "initialDelaySeconds": 30}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(owner, child_name(owner, "router"), "router"),
            "spec": {"replicas": spec.router.replicas, "selector": {"matchLabels": selector(owner, "router")},
                     "template": {"metadata": {"labels": labels(owner, "router")},
                                  "spec": {"containers": [container], "volumes": _volumes(spec),
                                           "securityContext": {"runAsNonRoot": True},
                                           "automountServiceAccountToken": False}}}}


def router_service(owner: Owner, spec: EPDDeploymentSpec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, owner.name, "router"),
            "spec": {"type": spec.router.service_type, "selector": selector(owner, "router"),
                     "ports": [{"name": "http", "port": spec.router.port, "targetPort": "http"}]}}


def config_map(owner: Owner, spec: EPDDeploymentSpec) -> dict:
    data = {"EPD_MODEL": spec.model.name, "EPD_MODEL_REVISION": spec.model.revision, "EPD_DTYPE": spec.model.dtype,
            "EPD_SLO_TTFT_SECONDS": str(spec.slo.ttft_seconds), "EPD_SLO_TPOT_SECONDS": str(spec.slo.tpot_seconds),
            "EPD_SLO_PERCENTILE": str(spec.slo.percentile)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(owner, child_name(owner, "config"), "config"),
            "data": data}


def redis_statefulset(owner: Owner) -> dict:
    name = child_name(owner, "redis")
    container = {"name": "redis", "image": "redis:7-alpine", "args": ["--save", "", "--appendonly", "no"],
                 "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                 "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
                 "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}},
                 "securityContext": {**SECURITY_CONTEXT, "runAsUser": 999, "runAsGroup": 999}}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(owner, name, "redis"),
            "spec": {"replicas": 1, "serviceName": name, "selector": {"matchLabels": selector(owner, "redis")},
                     "template": {"metadata": {"labels": labels(owner, "redis")},
                                  "spec": {"containers": [container], "automountServiceAccountToken": False}}}}


def redis_service(owner: Owner) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, child_name(owner, "redis"), "redis"),
            "spec": {"selector": selector(owner, "redis"), "ports": [{"name": "redis", "port": REDIS_PORT}]}}


def build_children(owner: Owner, spec: EPDDeploymentSpec) -> list[dict]:
    """Everything one EPDDeployment owns, in apply order."""
    children = [config_map(owner, spec)]
    if spec.cache.managed_redis:
        children += [redis_service(owner), redis_statefulset(owner)]
    for stage in STAGES:
        children += [stage_service(owner, stage), stage_statefulset(owner, spec, stage),
                     disruption_budget(owner, stage)]
    children += [router_service(owner, spec), router_deployment(owner, spec)]
    return children


def endpoint(owner: Owner, spec: EPDDeploymentSpec) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc:{spec.router.port}/v1"
