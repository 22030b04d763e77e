"""The workloads: one StatefulSet per stage and the router Deployment, with
their command lines (the `epd worker` / `epd router` flags), model delivery
(a read-only weights PVC, or a download at start into a cache volume), TLS,
Redis credentials and Pod Security `restricted` contexts."""

from __future__ import annotations

import math
from typing import Any

from kubernetes.utils import parse_quantity

from . import redis, tls
from .naming import (
    GRPC_PORT,
    HEALTH_PORT,
    KV_TCP_PORT,
    METRICS_PORT,
    Owner,
    child_name,
    labels,
    meta,
    selector,
)
from .security import CONTAINER_SECURITY, EPD_UID, POD_SECURITY
from .spec import EPDDeploymentSpec

BATCH_FLAG = {"encode": "--encode-max-batch", "prefill": "--prefill-token-budget", "decode": "--decode-max-batch"}
MODEL_DIR = "/models"  # a weights PVC
DOWNLOAD_CACHE = "/var/cache/epd"  # hub downloads (HF_HUB_CACHE below it)
STARTUP_PERIOD = 10
DRAIN_MARGIN = 5  # seconds of the grace period left after the drain, for the process to exit


def model_argument(spec: EPDDeploymentSpec) -> str:
    """With a weights PVC the name is a directory inside it; otherwise a hub id or preset."""
    return f"{MODEL_DIR}/{spec.model.name.lstrip('/')}" if spec.model.pvc else spec.model.name


def _model_storage(spec: EPDDeploymentSpec, per_pod_claim: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts, env) delivering the model. `per_pod_claim`: the pod template belongs to a
    StatefulSet whose volumeClaimTemplate provides the `model-cache` volume."""
    model = spec.model
    if model.pvc:
        return ([{"name": "model", "persistentVolumeClaim": {"claimName": model.pvc, "readOnly": True}}],
                [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True}], [])
    env = [{"name": "EPD_MODEL_DOWNLOAD", "value": "1"}, {"name": "HF_HUB_CACHE", "value": f"{DOWNLOAD_CACHE}/hub"}]
    mounts = [{"name": "model-cache", "mountPath": DOWNLOAD_CACHE}]
    if model.cache.pvc:
        volumes = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": model.cache.pvc}}]
    elif model.cache.storage and per_pod_claim:
        volumes = []
    else:
        volumes = [{"name": "model-cache", "emptyDir": {}}]
    return volumes, mounts, env


def volume_claim_templates(spec: EPDDeploymentSpec) -> list[dict[str, Any]]:
    cache = spec.model.cache
    if spec.model.pvc or not cache.storage:
        return []
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": cache.storage}}}
    if cache.storage_class_name:
        claim["storageClassName"] = cache.storage_class_name
    return [{"metadata": {"name": "model-cache"}, "spec": claim}]


def _container(owner: Owner, spec: EPDDeploymentSpec, name: str, command: list[str], extra_env: list[dict[str, Any]],
               resources: dict[str, Any], ports: list[dict[str, Any]]) -> dict[str, Any]:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "EPD_MODEL_CACHE", "value": "/tmp/epd-models"},
           redis.url_env(owner, spec), *extra_env]
    env_from = [{"configMapRef": {"name": child_name(owner, "config")}}]
    if spec.model.secret:
        env_from.append({"secretRef": {"name": spec.model.secret}})
    return {"name": name, "image": spec.image, "imagePullPolicy": "IfNotPresent", "command": command, "env": env,
            "envFrom": env_from, "ports": ports, "resources": resources, "securityContext": CONTAINER_SECURITY,
            "terminationMessagePolicy": "FallbackToLogsOnError",  # the log's tail says why a start failed
            "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]}


def _pod(owner: Owner, spec: EPDDeploymentSpec, component: str, container: dict[str, Any], grace: int,
         per_pod_claim: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, template metadata) shared by the stages and the router."""
    volumes, mounts, env = _model_storage(spec, per_pod_claim)
    redis_volumes, redis_mounts = redis.ca_volume(spec)
    volumes = [{"name": "scratch", "emptyDir": {}}, *volumes, *redis_volumes]
    container["volumeMounts"] += mounts + redis_mounts
    container["env"] += env
    if spec.tls.enabled:  # the workers re-read renewed files: a new certificate needs no restart
        tls_volume, tls_mount = tls.volume(owner)
        volumes.append(tls_volume)
        container["volumeMounts"].append(tls_mount)
    pod_spec = {"containers": [container], "volumes": volumes, "automountServiceAccountToken": False,
                "securityContext": {**POD_SECURITY, "fsGroup": EPD_UID}, "terminationGracePeriodSeconds": grace}
    return pod_spec, {"labels": labels(owner, component)}


def stage_command(owner: Owner, spec: EPDDeploymentSpec, stage: str) -> list[str]:
    service = child_name(owner, stage)
    grace = spec.stages[stage].termination_grace_period_seconds
    command = ["epd", "worker", "--role", stage, "--model", model_argument(spec),
               "--host", "0.0.0.0", "--port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT),
               "--health-port", str(HEALTH_PORT),
               "--advertise", f"$(POD_NAME).{service}.{owner.namespace}.svc:{GRPC_PORT}",
               "--cache-bytes", str(spec.cache.cache_bytes), "--cache-ttl", str(spec.cache.ttl_seconds),
               "--drain-timeout", str(max(1, grace - DRAIN_MARGIN))]
    if stage == "prefill":
        command += ["--prefix-cache-bytes", str(spec.cache.prefix_cache_bytes)]
    if stage == "decode":
        command += ["--kv-tcp-port", str(KV_TCP_PORT)]
    if spec.stages[stage].max_batch:
        command += [BATCH_FLAG[stage], str(spec.stages[stage].max_batch)]
    if spec.tls.enabled:
        command += tls.flags()
    if spec.grpc_reflection:
        command.append("--grpc-reflection")
    threads = torch_threads(spec.stages[stage].resources)
    if threads:
        command += ["--torch-threads", str(threads)]
    return command


def torch_threads(resources: dict[str, Any]) -> int:
    """The worker's model threads from its CPU limit (else request); 0 without either. A container sees
    every core of its node, and torch would start a thread per node core under a quota of a few."""
    cpu = (resources.get("limits") or {}).get("cpu") or (resources.get("requests") or {}).get("cpu")
    return max(1, math.ceil(parse_quantity(cpu))) if cpu is not None else 0


def stage_statefulset(owner: Owner, spec: EPDDeploymentSpec, stage: str, replicas: int) -> dict[str, Any]:
    stage_spec = spec.stages[stage]
    service = child_name(owner, stage)
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}, *stage_spec.env]
    container = _container(owner, spec, "worker", stage_command(owner, spec, stage), env, stage_spec.resources,
                           [{"name": "grpc", "containerPort": GRPC_PORT},
                            {"name": "metrics", "containerPort": METRICS_PORT},
                            {"name": "health", "containerPort": HEALTH_PORT},
                            *([{"name": "kv-tcp", "containerPort": KV_TCP_PORT}] if stage == "decode" else [])])
    # gRPC health on its own plaintext port: the kubelet's probe cannot present a client certificate
    probe = {"grpc": {"port": HEALTH_PORT}, "periodSeconds": STARTUP_PERIOD, "failureThreshold": 3}
    container["readinessProbe"] = probe
    container["livenessProbe"] = {**probe, "initialDelaySeconds": 30, "failureThreshold": 6}
    # loading takes minutes; downloading a 7B model at start can take most of an hour
    container["startupProbe"] = {**probe, "failureThreshold": 360 if spec.model.downloads else 90}
    claims = volume_claim_templates(spec)
    pod_spec, template_meta = _pod(owner, spec, stage, container, stage_spec.termination_grace_period_seconds,
                                   per_pod_claim=bool(claims))
    for key, value in (("nodeSelector", stage_spec.node_selector), ("tolerations", stage_spec.tolerations),
                       ("affinity", stage_spec.affinity)):
        if value:
            pod_spec[key] = value
    template_meta["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT)}
    body = {"replicas": replicas, "serviceName": service, "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(owner, stage)},
            "template": {"metadata": template_meta, "spec": pod_spec}}
    if claims:
        body["volumeClaimTemplates"] = claims
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta(owner, service, stage), "spec": body}


def router_command(spec: EPDDeploymentSpec) -> list[str]:
    command = ["epd", "router", "--host", "0.0.0.0", "--port", str(spec.router.port),
               "--metrics-port", str(spec.router.metrics_port), "--model", model_argument(spec),
               "--served-model-name", spec.model.name]
    return command + (tls.flags() if spec.tls.enabled else [])


def router_deployment(owner: Owner, spec: EPDDeploymentSpec) -> dict[str, Any]:
    router = spec.router
    env = []
    if router.api_key_secret:
        env.append({"name": "EPD_API_KEYS",
                    "valueFrom": {"secretKeyRef": {"name": router.api_key_secret, "key": "api-keys"}}})
    container = _container(owner, spec, "router", router_command(spec), env,
                           {"requests": {"cpu": "500m", "memory": "1Gi"}},
                           [{"name": "http", "containerPort": router.port},
                            {"name": "metrics", "containerPort": router.metrics_port}])
    container["readinessProbe"] = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}
    container["livenessProbe"] = {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 10,
                                  "initialDelaySeconds": 30}
    pod_spec, template_meta = _pod(owner, spec, "router", container, router.termination_grace_period_seconds,
                                   per_pod_claim=False)
    template_meta["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(router.metrics_port)}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(owner, child_name(owner, "router"), "router"),
            "spec": {"replicas": router.replicas, "selector": {"matchLabels": selector(owner, "router")},
                     "template": {"metadata": template_meta, "spec": pod_spec}}}
