"""Thin kopf handlers: watch events only, each handing the deployment to the
supervisor. No create/update/timer handlers, so kopf keeps no state on the
objects (no annotations, no finalizers) and needs no write access to them."""

from __future__ import annotations

from typing import Any

import kopf
from kubernetes import client

from .crd import GROUP, KIND, PLURAL, VERSION
from .naming import MANAGED_BY
from .stage_crd import PLURAL as STAGE_PLURAL
from .supervisor import Supervisor

# What the operator applies and watches for drift (Secrets it only creates: it may not read them).
CHILD_KINDS = (("apps", "v1", "statefulsets"), ("apps", "v1", "deployments"), ("", "v1", "services"),
               ("", "v1", "configmaps"), ("policy", "v1", "poddisruptionbudgets"),
               ("networking.k8s.io", "v1", "networkpolicies"), (GROUP, VERSION, STAGE_PLURAL))
OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY}


def connection_info(config: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials, from the kubernetes client the CLI configured (one source of truth)."""
    keys, prefixes = config.api_key or {}, config.api_key_prefix or {}
    name = next((k for k in ("BearerToken", "authorization") if keys.get(k)), "")
    token = keys.get(name, "")
    scheme = prefixes.get(name, "")
    if not scheme and " " in token:
        scheme, token = token.split(" ", 1)
    return kopf.ConnectionInfo(server=config.host, ca_path=config.ssl_ca_cert, insecure=not config.verify_ssl,
                               scheme=scheme or None, token=token or None, certificate_path=config.cert_file,
                               private_key_path=config.key_file)


def register(supervisor: Supervisor, registry: kopf.OperatorRegistry) -> None:
    """Attach the handlers to `registry`, all feeding `supervisor`."""

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(supervisor.cluster.api_client.configuration)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def on_deployment(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        supervisor.observe(event["type"], dict(body))

    async def on_child(body: kopf.Body, **_: Any) -> None:
        for ref in body.get("metadata", {}).get("ownerReferences", []):
            if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(GROUP):
                supervisor.request(ref["uid"])

    for group, version, plural in CHILD_KINDS:
        kopf.on.event(group, version, plural, labels=OWNED, registry=registry)(on_child)
