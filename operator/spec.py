"""Typed model of an EPDDeployment's spec, parsed from the custom resource.
Defaults live in the CRD schema (the apiserver applies them); this layer
turns the object into dataclasses the builders consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STAGES = ("encode", "prefill", "decode")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    revision: str = ""
    dtype: str = "bfloat16"
    pvc: str = ""  # PersistentVolumeClaim holding the weights, mounted read-only at /models
    secret: str = ""  # Secret with e.g. HF_TOKEN, exposed as env


@dataclass(frozen=True)
class StageSpec:
    replicas: int
    min_replicas: int
    max_replicas: int
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    max_batch: int = 0  # 0: the worker's default
    env: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RouterSpec:
    replicas: int = 1
    service_type: str = "ClusterIP"
    port: int = 8000


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
    window_seconds: int = 60
    cooldown_seconds: int = 120
    max_total_replicas: int = 0  # 0 = no limit across stages
    architecture: str = ""  # performance model for the predictive floor; empty = none
    hardware: str = "h100"


@dataclass(frozen=True)
class EPDDeploymentSpec:
    model: ModelSpec
    stages: dict[str, StageSpec]
    router: RouterSpec
    cache: CacheSpec
    slo: SLOSpec
    image: str
    autoscaling: AutoscalingSpec = AutoscalingSpec()

    @classmethod
    def from_resource(cls, spec: dict[str, Any], default_image: str) -> "EPDDeploymentSpec":
        model = spec["model"]
        stages = {}
        for stage in STAGES:
            raw = spec.get(stage, {})
            replicas = raw.get("replicas", 1)
            stages[stage] = StageSpec(
                replicas=replicas, min_replicas=raw.get("minReplicas", replicas),
                max_replicas=raw.get("maxReplicas", max(replicas, 1)), resources=raw.get("resources", {}),
                node_selector=raw.get("nodeSelector", {}), tolerations=raw.get("tolerations", []),
                affinity=raw.get("affinity", {}), max_batch=raw.get("maxBatch", 0), env=raw.get("env", []))
        router = spec.get("router", {})
        cache = spec.get("cache", {})
        redis = cache.get("redis", {})
        scaling = spec.get("autoscaling", {})
        slo = spec.get("slo", {})
        return cls(
            model=ModelSpec(name=model["name"], revision=model.get("revision", ""), dtype=model.get("dtype", "bfloat16"),
                            pvc=model.get("pvc", ""), secret=model.get("secret", "")),
            stages=stages,
            router=RouterSpec(replicas=router.get("replicas", 1), service_type=router.get("serviceType", "ClusterIP"),
                              port=router.get("port", 8000)),
            cache=CacheSpec(redis_url_secret=redis.get("urlSecret", ""), cache_bytes=cache.get("cacheBytes", 1 << 30),
                            prefix_cache_bytes=cache.get("prefixCacheBytes", 1 << 30),
                            ttl_seconds=cache.get("ttlSeconds", 3600)),
            slo=SLOSpec(ttft_seconds=slo.get("ttftSeconds", 2.0), tpot_seconds=slo.get("tpotSeconds", 0.1),
                        percentile=slo.get("percentile", 90)),
            image=spec.get("image") or default_image,
            autoscaling=AutoscalingSpec(enabled=scaling.get("enabled", False),
                                        window_seconds=scaling.get("windowSeconds", 60),
                                        cooldown_seconds=scaling.get("cooldownSeconds", 120),
                                        max_total_replicas=scaling.get("maxTotalReplicas", 0),
                                        architecture=scaling.get("architecture", ""),
                                        hardware=scaling.get("hardware", "h100")))

    def secrets(self) -> list[str]:
        """Secrets the workloads reference (a missing one makes the deployment Degraded)."""
        return [name for name in (self.model.secret, self.cache.redis_url_secret) if name]
