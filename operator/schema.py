"""OpenAPI v3 schema fragments shared by the CustomResourceDefinitions."""

from __future__ import annotations

from typing import Any

# A Kubernetes resource.Quantity ("1", "500m", "16Gi", "1e3"): the pattern controller-gen emits for
# Quantity fields, without a sign (no resource is negative). It is what refuses `nvidia.com/gpu: lots`.
QUANTITY_PATTERN = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


def integer(description: str, minimum: int | None = None, maximum: int | None = None,
            default: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "description": description}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if default is not None:
        schema["default"] = default
    return schema


def string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def boolean(description: str, default: bool) -> dict[str, Any]:
    return {"type": "boolean", "description": description, "default": default}


def free_object(description: str, kind: str = "object") -> dict[str, Any]:
    """Passed through as the user wrote it (Kubernetes validates it where it lands)."""
    schema: dict[str, Any] = {"type": kind, "description": description}
    if kind == "object":
        schema["x-kubernetes-preserve-unknown-fields"] = True
    else:
        schema["items"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return schema


def positive_seconds(description: str, default: float) -> dict[str, Any]:
    return {"type": "number", "description": description, "minimum": 0, "exclusiveMinimum": True, "default": default}


def quantity() -> dict[str, Any]:
    return {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN}


def resources(description: str) -> dict[str, Any]:
    """Container resources with every quantity checked at admission."""
    quantities = {"type": "object", "additionalProperties": quantity()}
    return {"type": "object", "description": description, "properties": {
        "limits": {**quantities, "description": "Resource limits, e.g. {nvidia.com/gpu: 1, memory: 80Gi}."},
        "requests": {**quantities, "description": "Resource requests, e.g. {cpu: '8', memory: 64Gi}."},
        "claims": free_object("Dynamic resource claims (Kubernetes ResourceClaim references).", "array")}}


def condition() -> dict[str, Any]:
    return {"type": "object", "required": ["type", "status"], "properties": {
        "type": {"type": "string"}, "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"}, "message": {"type": "string"}, "observedGeneration": {"type": "integer"},
        "lastTransitionTime": {"type": "string", "format": "date-time"}}}


def custom_resource_definition(group: str, version: str, kind: str, plural: str, short_names: list[str],
                               spec: dict[str, Any], status: dict[str, Any], columns: list[dict[str, Any]], description: str,
                               subresources: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": short_names, "categories": ["all"]},
            "scope": "Namespaced",
            "versions": [{
                "name": version, "served": True, "storage": True,
                "subresources": subresources,
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object", "description": description,
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "metadata": {"type": "object"}, "spec": spec, "status": status},
                    "required": ["spec"]}},
            }],
        },
    }
