"""The committed CRD is exactly what the schema generates, and the schema and
the typed spec model describe the same fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from epd.operator import crd
from epd.operator.spec import CacheSpec, EPDDeploymentSpec, ModelSpec, RouterSpec, SLOSpec, StageSpec

ROOT = Path(__file__).resolve().parents[2]


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def test_committed_crd_is_generated():
    assert (ROOT / "crds" / "epddeployment.yaml").read_text() == crd.render()
    chart_copy = ROOT / "helm" / "epd-serve" / "crds" / "epddeployment.yaml"
    assert chart_copy.resolve() == (ROOT / "crds" / "epddeployment.yaml").resolve()


def test_schema_and_typed_model_agree():
    spec = crd.spec_schema()["properties"]
    stage_fields = {camel(f.name) for f in dataclasses.fields(StageSpec)}
    assert set(spec["encode"]["properties"]) == stage_fields
    assert set(spec["model"]["properties"]) == {camel(f.name) for f in dataclasses.fields(ModelSpec)}
    assert set(spec["router"]["properties"]) == {camel(f.name) for f in dataclasses.fields(RouterSpec)}
    assert set(spec["slo"]["properties"]) == {camel(f.name) for f in dataclasses.fields(SLOSpec)}
    assert {"cacheBytes", "prefixCacheBytes", "ttlSeconds"} == {camel(f.name) for f in dataclasses.fields(CacheSpec)} - {"redisUrlSecret"}


def test_defaults_in_the_schema_match_the_model():
    spec = crd.spec_schema()["properties"]
    parsed = EPDDeploymentSpec.from_resource({"model": {"name": "m"}}, "img")
    assert spec["router"]["properties"]["port"]["default"] == parsed.router.port
    assert spec["slo"]["properties"]["ttftSeconds"]["default"] == parsed.slo.ttft_seconds
    assert spec["slo"]["properties"]["tpotSeconds"]["default"] == parsed.slo.tpot_seconds
    assert spec["cache"]["properties"]["cacheBytes"]["default"] == parsed.cache.cache_bytes
    assert parsed.cache.managed_redis and parsed.image == "img"


def test_printer_columns_and_names():
    version = crd.crd()["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == \
        ["Ready", "Encode", "Prefill", "Decode", "TTFT-P90", "Age"]
    assert crd.crd()["spec"]["names"]["shortNames"] == ["epd"]
    assert version["subresources"] == {"status": {}}
    assert yaml.safe_load(crd.render())["metadata"]["name"] == "epddeployments.serving.epd.dev"
