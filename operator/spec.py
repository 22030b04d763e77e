"""Typed model of an EPDDeployment's spec, parsed from the custom resource.

The field defaults of these dataclasses are the spec's defaults, written once:
the CRD generator (crd.py) publishes them in the schema, where the apiserver
applies them, and the parser falls back to them for objects the apiserver did
not default (built in tests, or by an older CRD)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epd.stages import STAGES

# Seconds a stage's pod gets between SIGTERM and SIGKILL to drain what it holds: decode streams
# whole answers, prefill finishes a batch and hands its KV over, encode only finishes a batch.
GRACE_SECONDS = {"encode": 30, "prefill": 60, "decode": 300}
ROUTER_GRACE_SECONDS = 60


@dataclass(frozen=True)
class ModelCacheSpec:
    """Where a hub model is downloaded to: a shared PVC, a PVC per worker pod, or (neither) an emptyDir."""

    pvc: str = ""
    storage: str = ""  # size of the per-pod PVC; set => volumeClaimTemplate
    storage_class_name: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    revision: str = ""
    dtype: str = "bfloat16"
    pvc: str = ""  # PersistentVolumeClaim holding the weights, mounted read-only at /models: no download
    secret: str = ""  # Secret with e.g. HF_TOKEN, exposed as env
    cache: ModelCacheSpec = ModelCacheSpec()

    @property
    def downloads(self) -> bool:
        """Pods fetch a hub id at start unless a PVC already holds the model."""
        return self.pvc == ""


@dataclass(frozen=True)
class StageSpec:
    """One stage's StatefulSet: its scale bounds and what its pods get."""

    replicas: int = 1
    min_replicas: int = 1  # unset in the resource: replicas
    max_replicas: int = 1  # unset in the resource: max(replicas, 1)
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    max_batch: int = 0  # 0: the worker's default
    env: list[dict[str, Any]] = field(default_factory=list)
    termination_grace_period_seconds: int = 30


@dataclass(frozen=True)
class RouterSpec:
    replicas: int = 1
    service_type: str = "ClusterIP"
    port: int = 8000
    metrics_port: int = 9100
    api_key_secret: str = ""  # Secret with key `api-keys` (comma-separated)
    termination_grace_period_seconds: int = ROUTER_GRACE_SECONDS


@dataclass(frozen=True)
class CacheSpec:
    redis_url_secret: str = ""  # Secret name with key `url`; empty = operator-managed Redis
    cache_bytes: int = 1 << 30
    prefix_cache_bytes: int = 1 << 30  # prefill's prefix KV cache
    ttl_seconds: int = 3600

    @property
    def managed_redis(self) -> bool:
        return not self.redis_url_secret


@dataclass(frozen=True)
class SLOSpec:
    ttft_seconds: float = 2.0
    tpot_seconds: float = 0.1
    percentile: int = 90


@dataclass(frozen=True)
class AutoscalingSpec:
    enabled: bool = False
    metrics_source: str = "direct"  # direct: each pod's /metrics; prometheus: PromQL
    prometheus_url: str = ""  # empty: the operator's --prometheus-url
    window_seconds: int = 60
    cooldown_seconds: int = 120
    max_total_replicas: int = 0  # 0 = no limit across stages
    architecture: str = ""  # performance model for the predictive floor; empty = none
    hardware: str = "h100"


@dataclass(frozen=True)
class TLSSpec:
    enabled: bool = True
    provider: str = "auto"  # auto: cert-manager when its CRD is there, else the operator's own CA
    issuer_name: str = ""  # a cert-manager Issuer/ClusterIssuer to use instead of a per-deployment CA
    issuer_kind: str = "Issuer"


@dataclass(frozen=True)
class EPDDeploymentSpec:
    model: ModelSpec
    stages: dict[str, StageSpec]
    router: RouterSpec
    cache: CacheSpec
    slo: SLOSpec
    image: str
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    tls: TLSSpec = TLSSpec()
    network_policy: bool = True
    grpc_reflection: bool = False

    @classmethod
    def from_resource(cls, spec: dict[str, Any], default_image: str) -> EPDDeploymentSpec:
        model = spec["model"]
        cache_dir = model.get("cache", {})
        stages: dict[str, StageSpec] = {stage: _stage(spec.get(stage, {}), GRACE_SECONDS[stage]) for stage in STAGES}
        router = spec.get("router", {})
        cache = spec.get("cache", {})
        redis = cache.get("redis", {})
        scaling = spec.get("autoscaling", {})
        slo = spec.get("slo", {})
        tls = spec.get("tls", {})
        issuer = tls.get("issuerRef", {})
        return cls(
            model=ModelSpec(name=model["name"], revision=model.get("revision", ""), dtype=model.get("dtype", ModelSpec.dtype),
                            pvc=model.get("pvc", ""), secret=model.get("secret", ""),
                            cache=ModelCacheSpec(pvc=cache_dir.get("pvc", ""), storage=cache_dir.get("storage", ""),
                                                 storage_class_name=cache_dir.get("storageClassName", ""))),
            stages=stages,
            router=RouterSpec(replicas=router.get("replicas", RouterSpec.replicas),
                              service_type=router.get("serviceType", RouterSpec.service_type),
                              port=router.get("port", RouterSpec.port),
                              metrics_port=router.get("metricsPort", RouterSpec.metrics_port),
                              api_key_secret=router.get("apiKeySecret", ""),
                              termination_grace_period_seconds=router.get("terminationGracePeriodSeconds",
                                                                          ROUTER_GRACE_SECONDS)),
            cache=CacheSpec(redis_url_secret=redis.get("urlSecret", ""),
                            cache_bytes=cache.get("cacheBytes", CacheSpec.cache_bytes),
                            prefix_cache_bytes=cache.get("prefixCacheBytes", CacheSpec.prefix_cache_bytes),
                            ttl_seconds=cache.get("ttlSeconds", CacheSpec.ttl_seconds)),
            slo=SLOSpec(ttft_seconds=slo.get("ttftSeconds", SLOSpec.ttft_seconds),
                        tpot_seconds=slo.get("tpotSeconds", SLOSpec.tpot_seconds),
                        percentile=slo.get("percentile", SLOSpec.percentile)),
            image=spec.get("image") or default_image,
            autoscaling=AutoscalingSpec(enabled=scaling.get("enabled", AutoscalingSpec.enabled),
                                        metrics_source=scaling.get("metricsSource", AutoscalingSpec.metrics_source),
                                        prometheus_url=scaling.get("prometheus", {}).get("url", ""),
                                        window_seconds=scaling.get("windowSeconds", AutoscalingSpec.window_seconds),
                                        cooldown_seconds=scaling.get("cooldownSeconds",
                                                                     AutoscalingSpec.cooldown_seconds),
                                        max_total_replicas=scaling.get("maxTotalReplicas",
                                                                       AutoscalingSpec.max_total_replicas),
                                        architecture=scaling.get("architecture", ""),
                                        hardware=scaling.get("hardware", AutoscalingSpec.hardware)),
            tls=TLSSpec(enabled=tls.get("enabled", TLSSpec.enabled), provider=tls.get("provider", TLSSpec.provider),
                        issuer_name=issuer.get("name", ""), issuer_kind=issuer.get("kind", TLSSpec.issuer_kind)),
            network_policy=spec.get("networkPolicy", {}).get("enabled", EPDDeploymentSpec.network_policy),
            grpc_reflection=spec.get("grpcReflection", EPDDeploymentSpec.grpc_reflection))

    def secrets(self) -> list[str]:
        """Secrets the user names (a missing one makes the deployment Degraded)."""
        return [name for name in (self.model.secret, self.cache.redis_url_secret, self.router.api_key_secret) if name]


def _stage(raw: dict[str, Any], grace: int) -> StageSpec:
    replicas = raw.get("replicas", StageSpec.replicas)
    return StageSpec(replicas=replicas, min_replicas=raw.get("minReplicas", replicas),
                     max_replicas=raw.get("maxReplicas", max(replicas, 1)), resources=raw.get("resources", {}),
                     node_selector=raw.get("nodeSelector", {}), tolerations=raw.get("tolerations", []),
                     affinity=raw.get("affinity", {}), max_batch=raw.get("maxBatch", StageSpec.max_batch),
                     env=raw.get("env", []),
                     termination_grace_period_seconds=raw.get("terminationGracePeriodSeconds", grace))
