"""The committed CRDs are exactly what the schemas generate, and the schemas
and the typed spec model describe the same fields and defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from epd.operator import crd, stage_crd
from epd.operator.schema import QUANTITY_PATTERN
from epd.operator.spec import (
    GRACE_SECONDS,
    AutoscalingSpec,
    CacheSpec,
    EPDDeploymentSpec,
    ModelSpec,
    RouterSpec,
    SLOSpec,
    StageSpec,
)

ROOT = Path(__file__).resolve().parents[2]


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def test_committed_crds_are_generated():
    assert (ROOT / "crds" / "epddeployment.yaml").read_text() == crd.render()
    assert (ROOT / "crds" / "epdstage.yaml").read_text() == stage_crd.render()
    for name in ("epddeployment.yaml", "epdstage.yaml"):
        chart_copy = ROOT / "helm" / "epd-serve" / "crds" / name
        assert chart_copy.resolve() == (ROOT / "crds" / name).resolve()


def test_schema_and_typed_model_agree():
    spec = crd.spec_schema()["properties"]
    assert set(spec["encode"]["properties"]) == {camel(f.name) for f in dataclasses.fields(StageSpec)}
    assert set(spec["model"]["properties"]) == {camel(f.name) for f in dataclasses.fields(ModelSpec)}
    assert set(spec["router"]["properties"]) == {camel(f.name) for f in dataclasses.fields(RouterSpec)}
    assert set(spec["slo"]["properties"]) == {camel(f.name) for f in dataclasses.fields(SLOSpec)}
    assert {"cacheBytes", "prefixCacheBytes", "ttlSeconds"} == \
        {camel(f.name) for f in dataclasses.fields(CacheSpec)} - {"redisUrlSecret"}
    assert set(spec["autoscaling"]["properties"]) == \
        {camel(f.name) for f in dataclasses.fields(AutoscalingSpec)} - {"prometheusUrl"} | {"prometheus"}


def test_defaults_in_the_schema_match_the_model():
    spec = crd.spec_schema()["properties"]
    parsed = EPDDeploymentSpec.from_resource({"model": {"name": "m"}}, "img")
    assert spec["router"]["properties"]["port"]["default"] == parsed.router.port
    assert spec["router"]["properties"]["metricsPort"]["default"] == parsed.router.metrics_port
    assert spec["router"]["properties"]["terminationGracePeriodSeconds"]["default"] == \
        parsed.router.termination_grace_period_seconds
    for stage, grace in GRACE_SECONDS.items():
        assert spec[stage]["properties"]["terminationGracePeriodSeconds"]["default"] == grace == \
            parsed.stages[stage].termination_grace_period_seconds
    assert spec["slo"]["properties"]["ttftSeconds"]["default"] == parsed.slo.ttft_seconds
    assert spec["slo"]["properties"]["tpotSeconds"]["default"] == parsed.slo.tpot_seconds
    assert spec["cache"]["properties"]["cacheBytes"]["default"] == parsed.cache.cache_bytes
    assert spec["tls"]["properties"]["enabled"]["default"] is parsed.tls.enabled is True
    assert spec["networkPolicy"]["properties"]["enabled"]["default"] is parsed.network_policy is True
    assert spec["grpcReflection"]["default"] is parsed.grpc_reflection is False
    assert spec["autoscaling"]["properties"]["metricsSource"]["default"] == parsed.autoscaling.metrics_source
    assert parsed.cache.managed_redis and parsed.image == "img" and parsed.model.downloads


def test_resource_quantities_are_checked_at_admission():
    limits = crd.spec_schema()["properties"]["encode"]["properties"]["resources"]["properties"]["limits"]
    assert limits["additionalProperties"]["x-kubernetes-int-or-string"] is True
    pattern = re.compile(QUANTITY_PATTERN)
    assert all(pattern.match(q) for q in ("1", "500m", "16Gi", "1.5", "2e3", "0"))
    assert not any(pattern.match(q) for q in ("lots", "-1", "1 Gi", "1GB", ""))


def test_printer_columns_and_names():
    version = crd.crd()["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == \
        ["Ready", "Encode", "Prefill", "Decode", "TTFT-P90", "Age"]
    assert crd.crd()["spec"]["names"]["shortNames"] == ["epd"]
    assert version["subresources"] == {"status": {}}
    assert yaml.safe_load(crd.render())["metadata"]["name"] == "epddeployments.serving.epd.dev"


def test_epdstage_has_a_scale_subresource_an_hpa_can_drive():
    version = stage_crd.crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    assert stage_crd.crd()["metadata"]["name"] == "epdstages.serving.epd.dev"
    assert [c["name"] for c in version["additionalPrinterColumns"]] == \
        ["Deployment", "Stage", "Desired", "Current", "Ready", "Age"]
