"""Reading EPDDeployments and their children in the e2e tests."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from epd.stages import STAGES  # noqa: F401  (re-exported for the tests)

from .controlplane import ControlPlane

ROOT = Path(__file__).resolve().parent.parent
CHILD_KINDS = ("statefulsets", "deployments", "services", "configmaps", "poddisruptionbudgets", "networkpolicies",
               "epdstages")


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def minimal(name: str = "tiny", **spec) -> dict:
    manifest = copy.deepcopy(example("minimal.yaml"))
    manifest["metadata"]["name"] = name
    manifest["spec"].update(spec)
    return manifest


def epd(plane: ControlPlane, namespace: str, name: str) -> dict:
    return plane.get("epddeployment", name, "-n", namespace)


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def status_of(obj: dict, kind: str) -> str | None:
    return condition(obj, kind).get("status")


def ready(plane: ControlPlane, namespace: str, name: str) -> dict | None:
    obj = epd(plane, namespace, name)
    return obj if status_of(obj, "Ready") == "True" else None


def children(plane: ControlPlane, namespace: str, instance: str) -> dict[str, dict]:
    found = {}
    for kind in CHILD_KINDS:
        for item in plane.get(kind, "-n", namespace, "-l", f"app.kubernetes.io/instance={instance}")["items"]:
            found[f"{item['kind']}/{item['metadata']['name']}"] = item
    return found


def events(plane: ControlPlane, namespace: str, name: str, reason: str) -> list[dict]:
    return [e for e in plane.get("events", "-n", namespace)["items"]
            if e["involvedObject"]["name"] == name and e["reason"] == reason]


def replicas(plane: ControlPlane, namespace: str, kind: str, name: str) -> int:
    return plane.get(kind, name, "-n", namespace)["spec"]["replicas"]
