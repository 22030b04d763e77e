"""The EPDDeployment CustomResourceDefinition, generated from one schema here.

`python -m epd.operator.crd crds/` regenerates the files that kubectl, Helm and
the tests use (this one and the EPDStage's, stage_crd.py); a test keeps the
files, these schemas and the typed spec model (spec.py) in step."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from epd.stages import STAGES

from . import spec as typed  # the typed spec model: its field defaults are the schema's
from .schema import (
    boolean,
    condition,
    custom_resource_definition,
    free_object,
    integer,
    positive_seconds,
    resources,
    string,
)
from .sizing.architectures import ARCHITECTURES
from .sizing.hardware import HARDWARE
from .spec import GRACE_SECONDS

GROUP = "serving.epd.dev"
VERSION = "v1alpha1"
KIND = "EPDDeployment"
PLURAL = "epddeployments"
ROLES = {"encode": "image preprocessing + vision tower + projector",
         "prefill": "merges text and image tokens, first token, KV cache",
         "decode": "continuous batching over the KV cache"}


def grace(description: str, default: int) -> dict[str, Any]:
    return integer(f"Seconds between SIGTERM and SIGKILL: {description}", 1, default=default)


def stage_schema(stage: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"The {stage} stage: {ROLES[stage]}. One StatefulSet on its own GPU node pool, "
                       f"scaled through its EPDStage.",
        "properties": {
            "replicas": integer("Workers of this stage. Written through to the stage's EPDStage when it changes "
                                "(`kubectl scale epdstage`, an HPA or the autoscaler change the EPDStage, "
                                "not this field).", 0, default=typed.StageSpec.replicas),
            "minReplicas": integer("Lower bound for the built-in autoscaler.", 0),
            "maxReplicas": integer("Upper bound for the built-in autoscaler.", 0),
            "resources": resources("Container resources, e.g. limits: {nvidia.com/gpu: 1}."),
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"},
                             "description": "Labels selecting this stage's node pool."},
            "tolerations": free_object("Tolerations for the pool's taints.", "array"),
            "affinity": free_object("Pod affinity rules."),
            "maxBatch": integer("Batch limit of the stage (encode: images, prefill: tokens, decode: sequences); "
                                "0 keeps the worker's default.", 0, default=typed.StageSpec.max_batch),
            "env": free_object("Extra environment variables (Kubernetes EnvVar objects).", "array"),
            "terminationGracePeriodSeconds": grace("a worker leaves discovery and finishes what it holds.",
                                                   GRACE_SECONDS[stage]),
        },
        "x-kubernetes-validations": [
            {"rule": "!has(self.minReplicas) || self.minReplicas <= self.replicas",
             "message": "minReplicas must be <= replicas"},
            {"rule": "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
             "message": "replicas must be <= maxReplicas"},
            {"rule": "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
             "message": "minReplicas must be <= maxReplicas"},
        ],
    }


def model_schema() -> dict[str, Any]:
    cache = {"type": "object", "description": "Where pods download a hub model to (default: an emptyDir per pod).",
             "properties": {
                 "pvc": string("A ReadWriteMany PersistentVolumeClaim shared by every pod as the download cache.",
                               minLength=1),
                 "storage": string("Size of a PersistentVolumeClaim per worker pod (kept across restarts), "
                                   "e.g. 40Gi.", minLength=1),
                 "storageClassName": string("StorageClass of the per-pod claim (a node-local class gives a "
                                            "per-node cache).")},
             "x-kubernetes-validations": [
                 {"rule": "!(has(self.pvc) && has(self.storage))", "message": "give the cache one way: pvc or storage"},
                 {"rule": "!has(self.storageClassName) || has(self.storage)",
                  "message": "storageClassName needs storage"}]}
    return {"type": "object", "required": ["name"], "description": "The model to serve.", "properties": {
        "name": string("Hub id (downloaded at pod start, each stage fetching only the shards it needs), "
                       "a directory inside `pvc`, or a built-in preset.", minLength=1),
        "revision": string("Hub revision (a commit pins it; a branch or tag is resolved at each start)."),
        "dtype": string("Weights dtype.", enum=["bfloat16", "float16", "float32"], default=typed.ModelSpec.dtype),
        "pvc": string("PersistentVolumeClaim already holding the weights, mounted read-only at /models "
                      "(nothing is downloaded)."),
        "secret": string("Secret whose keys become environment variables (e.g. HF_TOKEN for gated models)."),
        "cache": cache,
    }, "x-kubernetes-validations": [{"rule": "!(has(self.pvc) && has(self.cache))",
                                     "message": "a model on a pvc is not downloaded: drop cache"}]}


def router_schema() -> dict[str, Any]:
    return {"type": "object", "description": "The OpenAI-compatible HTTP router.", "properties": {
        "replicas": integer("Router replicas.", 1, default=typed.RouterSpec.replicas),
        "serviceType": string("Service type of the endpoint.", enum=["ClusterIP", "NodePort", "LoadBalancer"],
                              default=typed.RouterSpec.service_type),
        "port": integer("HTTP port.", 1, 65535, default=typed.RouterSpec.port),
        "metricsPort": integer("Port of the router's /metrics (reachable by the operator and scrapers only).",
                               1, 65535, default=typed.RouterSpec.metrics_port),
        "apiKeySecret": string("Secret whose key `api-keys` holds the accepted API keys, comma-separated.",
                               minLength=1),
        "terminationGracePeriodSeconds": grace("the router finishes its open streams.",
                                                typed.RouterSpec.termination_grace_period_seconds),
    }, "x-kubernetes-validations": [{"rule": "!has(self.metricsPort) || self.metricsPort != self.port",
                                     "message": "metricsPort must differ from port"}]}


def cache_schema() -> dict[str, Any]:
    redis = {"type": "object",
             "description": "Redis for cache metadata and discovery: exactly one of managed (the operator runs one, "
                            "with a generated password) or urlSecret.",
             "properties": {"managed": {"type": "boolean", "description": "Run a Redis StatefulSet."},
                            "urlSecret": string("Secret with key `url` (redis://:PASSWORD@host:6379/0, or rediss:// "
                                                "for TLS) and optionally `ca.crt` (mounted at "
                                                "/etc/epd/redis-tls/ca.crt).", minLength=1)},
             "x-kubernetes-validations": [{"rule": "(has(self.managed) && self.managed) != has(self.urlSecret)",
                                           "message": "give Redis exactly one way: managed: true or urlSecret"}]}
    return {"type": "object", "description": "Multimodal token cache.", "properties": {
        "redis": redis,
        "cacheBytes": integer("Embedding cache bytes per worker.", 0, default=typed.CacheSpec.cache_bytes),
        "prefixCacheBytes": integer("Prefix KV cache bytes per prefill worker (0 turns it off).", 0,
                                    default=typed.CacheSpec.prefix_cache_bytes),
        "ttlSeconds": integer("TTL of cache metadata records.", 1, default=typed.CacheSpec.ttl_seconds),
    }}


def autoscaling_schema() -> dict[str, Any]:
    return {"type": "object", "description": "SLO-aware scaling of each stage.", "properties": {
        "enabled": boolean("Let the built-in scaler set each stage's EPDStage replicas within minReplicas.."
                           "maxReplicas. While on it wins: another writer's replicas are reverted.", typed.AutoscalingSpec.enabled),
        "metricsSource": string("Where metrics come from: `direct` reads each pod's /metrics; `prometheus` asks a "
                                "Prometheus server (series labelled namespace, epd_deployment, epd_component).",
                                enum=["direct", "prometheus"], default=typed.AutoscalingSpec.metrics_source),
        "prometheus": {"type": "object", "description": "The Prometheus server for metricsSource: prometheus.",
                       "properties": {"url": string("Base URL, e.g. http://prometheus.monitoring:9090 (default: "
                                                    "the operator's --prometheus-url, which alone gets the "
                                                    "operator's bearer token).", pattern="^https?://")}},
        "windowSeconds": integer("Metrics window: the scaler decides once per window.", 1,
                                 default=typed.AutoscalingSpec.window_seconds),
        "cooldownSeconds": integer("Minimum time between steps of a stage.", 0,
                                   default=typed.AutoscalingSpec.cooldown_seconds),
        "maxTotalReplicas": integer("Most replicas of all stages together (a GPU budget when each replica "
                                    "has one GPU); under it, replicas move between stages. 0 = no limit.", 0,
                                    default=typed.AutoscalingSpec.max_total_replicas),
        "architecture": string("Performance-model architecture for the predictive floor (optional; "
                               "without it the scaler follows observed load and SLOs only).",
                               enum=sorted(ARCHITECTURES)),
        "hardware": string("GPU of the node pools, for the performance model.", enum=sorted(HARDWARE),
                           default=typed.AutoscalingSpec.hardware),
    }}


def tls_schema() -> dict[str, Any]:
    return {"type": "object", "description": "Mutual TLS between the router and the workers and among workers.",
            "properties": {
                "enabled": boolean("Serve and call gRPC with mutual TLS.", typed.TLSSpec.enabled),
                "provider": string("Who issues the certificates: cert-manager when its CRD is installed (auto), "
                                   "else a CA the operator makes for this deployment.",
                                   enum=["auto", "operator", "cert-manager"], default=typed.TLSSpec.provider),
                "issuerRef": {"type": "object", "description": "A cert-manager issuer to sign with instead of a "
                                                               "per-deployment CA.",
                              "required": ["name"],
                              "properties": {"name": string("Issuer name.", minLength=1),
                                             "kind": string("Issuer kind.", enum=["Issuer", "ClusterIssuer"],
                                                            default=typed.TLSSpec.issuer_kind)}}},
            "x-kubernetes-validations": [{"rule": "!has(self.issuerRef) || self.provider != 'operator'",
                                          "message": "issuerRef needs provider auto or cert-manager"}]}


def spec_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["model"],
        "properties": {
            "image": string("Container image running `epd` (defaults to the operator's)."),
            "model": model_schema(),
            **{stage: stage_schema(stage) for stage in STAGES},
            "router": router_schema(),
            "cache": cache_schema(),
            "slo": {"type": "object", "description": "Latency targets the scaler aims for.", "properties": {
                "ttftSeconds": positive_seconds("Time-to-first-token target.", typed.SLOSpec.ttft_seconds),
                "tpotSeconds": positive_seconds("Time-per-output-token target.", typed.SLOSpec.tpot_seconds),
                "percentile": integer("Percentile the targets apply to.", 1, 100, default=typed.SLOSpec.percentile),
            }},
            "autoscaling": autoscaling_schema(),
            "tls": tls_schema(),
            "networkPolicy": {"type": "object", "description": "NetworkPolicies letting only the router reach the "
                                                               "workers, only neighbouring stages reach each other, "
                                                               "only this deployment reach its Redis.",
                              "properties": {"enabled": boolean("Create them.", typed.EPDDeploymentSpec.network_policy)}},
            "grpcReflection": boolean("Serve gRPC reflection on the workers (debugging only).",
                                      typed.EPDDeploymentSpec.grpc_reflection),
        },
    }


def status_schema() -> dict[str, Any]:
    stage_status = {"type": "object", "properties": {
        "replicas": {"type": "integer"}, "ready": {"type": "integer"}, "desired": {"type": "integer"},
        "summary": {"type": "string"}, "lastScaleTime": {"type": "string"}, "lastScaleReason": {"type": "string"},
        "scaledReplicas": {"type": "integer", "description": "the built-in autoscaler's last choice"},
        "declaredReplicas": {"type": "integer", "description": "spec replicas last written through to the EPDStage"}}}
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
        "observedGeneration": {"type": "integer"},
        "conditions": {"type": "array", "items": condition(), "x-kubernetes-list-type": "map",
                       "x-kubernetes-list-map-keys": ["type"]},
        "stages": {"type": "object", "properties": {s: stage_status for s in STAGES}},
        "endpoint": {"type": "string"},
        "tls": {"type": "object", "properties": {"secretName": {"type": "string"}, "issuedBy": {"type": "string"},
                                                 "serial": {"type": "string"}, "notAfter": {"type": "string"}}},
        "observed": {"type": "object", "properties": {"ttftP90Seconds": {"type": "number"},
                                                      "tpotP90Seconds": {"type": "number"}}},
        "scalingHistory": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }}


def printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Encode", "type": "string", "jsonPath": ".status.stages.encode.summary",
         "description": "ready/desired encode workers"},
        {"name": "Prefill", "type": "string", "jsonPath": ".status.stages.prefill.summary"},
        {"name": "Decode", "type": "string", "jsonPath": ".status.stages.decode.summary"},
        {"name": "TTFT-P90", "type": "number", "jsonPath": ".status.observed.ttftP90Seconds"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd() -> dict[str, Any]:
    definition = custom_resource_definition(
        GROUP, VERSION, KIND, PLURAL, ["epd"], spec_schema(), status_schema(), printer_columns(),
        "A multimodal model served with Encode-Prefill-Decode disaggregation.", {"status": {}})
    return definition


def render() -> str:
    return "# Generated by `python -m epd.operator.crd crds/`; do not edit by hand.\n" + \
        yaml.safe_dump(crd(), sort_keys=False)


def write_all(directory: Path) -> None:
    """Write every CRD file (`python -m epd.operator.crd crds/`)."""
    from .stage_crd import render as render_stage

    (directory / "epddeployment.yaml").write_text(render())
    (directory / "epdstage.yaml").write_text(render_stage())


if __name__ == "__main__":
    write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "crds"))
