"""The EPDDeployment CustomResourceDefinition, generated from one schema here.

`python -m epd.operator.crd > crds/epddeployment.yaml` regenerates the file
that kubectl, Helm and the tests use; a test keeps the file, this schema and
the typed spec model (spec.py) in step."""

from __future__ import annotations

import sys
from typing import Any

import yaml

from .sizing.architectures import ARCHITECTURES
from .sizing.hardware import HARDWARE

GROUP = "serving.epd.dev"
VERSION = "v1alpha1"
KIND = "EPDDeployment"
PLURAL = "epddeployments"


def _int(description: str, minimum: int | None = None, maximum: int | None = None, default: int | None = None):
    schema: dict[str, Any] = {"type": "integer", "description": description}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if default is not None:
        schema["default"] = default
    return schema


def _string(description: str, **extra):
    return {"type": "string", "description": description, **extra}


def _free_object(description: str, kind: str = "object"):
    schema: dict[str, Any] = {"type": kind, "description": description}
    if kind == "object":
        schema["x-kubernetes-preserve-unknown-fields"] = True
    else:
        schema["items"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return schema


def _positive_seconds(description: str, default: float):
    return {"type": "number", "description": description, "minimum": 0, "exclusiveMinimum": True, "default": default}


def stage_schema(stage: str, role: str) -> dict:
    return {
        "type": "object",
        "description": f"The {stage} stage: {role}. One StatefulSet on its own GPU node pool.",
        "properties": {
            "replicas": _int("Workers of this stage.", 0, default=1),
            "minReplicas": _int("Lower bound for the autoscaler.", 0),
            "maxReplicas": _int("Upper bound for the autoscaler.", 0),
            "resources": _free_object("Container resources, e.g. limits: {nvidia.com/gpu: 1}."),
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"},
                             "description": "Labels selecting this stage's node pool."},
            "tolerations": _free_object("Tolerations for the pool's taints.", "array"),
            "affinity": _free_object("Pod affinity rules."),
            "maxBatch": _int("Batch limit of the stage (encode: images, prefill: tokens, decode: sequences); "
                             "0 keeps the worker's default.", 0, default=0),
            "env": _free_object("Extra environment variables (Kubernetes EnvVar objects).", "array"),
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


def spec_schema() -> dict:
    return {
        "type": "object",
        "required": ["model"],
        "properties": {
            "image": _string("Container image running `epd` (defaults to the operator's)."),
            "model": {"type": "object", "required": ["name"], "description": "The model to serve.", "properties": {
                "name": _string("Hub id, local path inside the model volume, or built-in preset.", minLength=1),
                "revision": _string("Hub revision (branch, tag or commit)."),
                "dtype": _string("Weights dtype.", enum=["bfloat16", "float16", "float32"], default="bfloat16"),
                "pvc": _string("PersistentVolumeClaim with the weights, mounted read-only at /models."),
                "secret": _string("Secret whose keys become environment variables (e.g. HF_TOKEN)."),
            }},
            "encode": stage_schema("encode", "image preprocessing + vision tower + projector"),
            "prefill": stage_schema("prefill", "merges text and image tokens, first token, KV cache"),
            "decode": stage_schema("decode", "continuous batching over the KV cache"),
            "router": {"type": "object", "description": "The OpenAI-compatible HTTP router.", "properties": {
                "replicas": _int("Router replicas.", 1, default=1),
                "serviceType": _string("Service type of the endpoint.", enum=["ClusterIP", "NodePort", "LoadBalancer"],
                                       default="ClusterIP"),
                "port": _int("HTTP port.", 1, 65535, default=8000),
            }},
            "cache": {"type": "object", "description": "Multimodal token cache.", "properties": {
                "redis": {"type": "object", "description": "Redis for cache metadata and discovery: exactly one of "
                                                          "managed (the operator runs one) or urlSecret.",
                          "properties": {"managed": {"type": "boolean", "description": "Run a Redis StatefulSet."},
                                         "urlSecret": _string("Secret with key `url` (redis://...).", minLength=1)},
                          "x-kubernetes-validations": [{
                              "rule": "(has(self.managed) && self.managed) != has(self.urlSecret)",
                              "message": "give Redis exactly one way: managed: true or urlSecret"}]},
                "cacheBytes": _int("Embedding cache bytes per worker.", 0, default=1 << 30),
                "prefixCacheBytes": _int("Prefix KV cache bytes per prefill worker (0 turns it off).", 0,
                                         default=1 << 30),
                "ttlSeconds": _int("TTL of cache metadata records.", 1, default=3600),
            }},
            "slo": {"type": "object", "description": "Latency targets the scaler aims for.", "properties": {
                "ttftSeconds": _positive_seconds("Time-to-first-token target.", 2.0),
                "tpotSeconds": _positive_seconds("Time-per-output-token target.", 0.1),
                "percentile": _int("Percentile the targets apply to.", 1, 100, default=90),
            }},
            "autoscaling": {"type": "object", "description": "SLO-aware scaling of each stage.", "properties": {
                "enabled": {"type": "boolean", "default": False,
                            "description": "Let the scaler set each stage's replicas within minReplicas..maxReplicas "
                                           "(a stage's replicas is then the starting point; editing it restarts "
                                           "the scaler from the new value)."},
                "metricsSource": _string("Where metrics come from: `direct` reads each pod's /metrics.",
                                         enum=["direct"], default="direct"),
                "windowSeconds": _int("Metrics window: the scaler decides once per window.", 1, default=60),
                "cooldownSeconds": _int("Minimum time between steps of a stage.", 0, default=120),
                "maxTotalReplicas": _int("Most replicas of all stages together (a GPU budget when each replica "
                                         "has one GPU); under it, replicas move between stages. 0 = no limit.",
                                         0, default=0),
                "architecture": _string("Performance-model architecture for the predictive floor (optional; "
                                        "without it the scaler follows observed load and SLOs only).",
                                        enum=sorted(ARCHITECTURES)),
                "hardware": _string("GPU of the node pools, for the performance model.", enum=sorted(HARDWARE),
                                    default="h100"),
            }},
        },
    }


def status_schema() -> dict:
    stage_status = {"type": "object", "properties": {
        "replicas": {"type": "integer"}, "ready": {"type": "integer"}, "desired": {"type": "integer"},
        "summary": {"type": "string"}, "lastScaleTime": {"type": "string"}, "lastScaleReason": {"type": "string"},
        "scaledReplicas": {"type": "integer", "description": "the autoscaler's choice"},
        "scaledFrom": {"type": "integer", "description": "spec replicas when it chose (a later edit voids it)"}}}
    condition = {"type": "object", "required": ["type", "status"], "properties": {
        "type": {"type": "string"}, "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"}, "message": {"type": "string"}, "observedGeneration": {"type": "integer"},
        "lastTransitionTime": {"type": "string", "format": "date-time"}}}
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
        "observedGeneration": {"type": "integer"},
        "conditions": {"type": "array", "items": condition, "x-kubernetes-list-type": "map",
                       "x-kubernetes-list-map-keys": ["type"]},
        "stages": {"type": "object", "properties": {s: stage_status for s in ("encode", "prefill", "decode")}},
        "endpoint": {"type": "string"},
        "observed": {"type": "object", "properties": {"ttftP90Seconds": {"type": "number"},
                                                      "tpotP90Seconds": {"type": "number"}}},
        "scalingHistory": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }}


def printer_columns() -> list[dict]:
    return [
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Encode", "type": "string", "jsonPath": ".status.stages.encode.summary",
         "description": "ready/desired encode workers"},
        {"name": "Prefill", "type": "string", "jsonPath": ".status.stages.prefill.summary"},
        {"name": "Decode", "type": "string", "jsonPath": ".status.stages.decode.summary"},
        {"name": "TTFT-P90", "type": "number", "jsonPath": ".status.observed.ttftP90Seconds"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": "epddeployment",
                      "shortNames": ["epd"], "categories": ["all"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": printer_columns(),
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A multimodal model served with Encode-Prefill-Decode disaggregation.",
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "metadata": {"type": "object"}, "spec": spec_schema(), "status": status_schema()},
                    "required": ["spec"]}},
            }],
        },
    }


def render() -> str:
    return "# Generated by `python -m epd.operator.crd`; do not edit by hand.\n" + yaml.safe_dump(crd(), sort_keys=False)


if __name__ == "__main__":
    sys.stdout.write(render())
