"""Thin kopf handlers: every trigger ends in the one Reconciler."""

from __future__ import annotations

import logging

import kopf

from .builders import MANAGED_BY
from .crd import GROUP, KIND, PLURAL, VERSION
from .autoscale.controller import Autoscaler
from .autoscale.status import scaling_status
from .reconcile import Reconciler
from .spec import EPDDeploymentSpec

log = logging.getLogger(__name__)
CHILD_KINDS = (("apps", "v1", "statefulsets"), ("apps", "v1", "deployments"), ("", "v1", "services"),
               ("", "v1", "configmaps"), ("policy", "v1", "poddisruptionbudgets"))
OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY}


def connection_info(config) -> kopf.ConnectionInfo:
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


def register(reconciler: Reconciler, registry: kopf.OperatorRegistry, drift_interval: float = 30.0,
             autoscaler: Autoscaler | None = None, autoscale_interval: float = 5.0) -> None:
    """Attach the handlers to `registry`, all driving `reconciler` (and `autoscaler`, if given)."""

    @kopf.on.login(registry=registry)
    def login(**_):
        return connection_info(reconciler.cluster.api_client.configuration)

    def run(body: dict, reason: str) -> None:
        result = reconciler.reconcile(body)
        if result.degraded:
            kopf.warn(body, reason=result.degraded, message=result.message)
        elif result.changed:
            kopf.info(body, reason=reason, message=f"applied {len(result.changed)} objects: "
                                                   f"{', '.join(result.changed[:6])}"
                                                   + (" ..." if len(result.changed) > 6 else ""))

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    def on_change(body, reason, **_):
        run(dict(body), "Reconciled")

    @kopf.timer(GROUP, VERSION, PLURAL, interval=drift_interval, initial_delay=drift_interval, registry=registry)
    def on_timer(body, **_):
        run(dict(body), "DriftCorrected")

    def on_child(event, body, namespace, **_):
        owners = [ref for ref in body.get("metadata", {}).get("ownerReferences", [])
                  if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(GROUP)]
        for ref in owners:
            # The reference is enough: reconcile reads the owner itself (and skips one going away).
            parent = {"apiVersion": ref["apiVersion"], "kind": KIND,
                      "metadata": {"name": ref["name"], "namespace": namespace, "uid": ref["uid"]}}
            run(parent, "DriftCorrected" if event["type"] == "DELETED" else "ChildChanged")

    for group, version, plural in CHILD_KINDS:
        kopf.on.event(group, version, plural, labels=OWNED, registry=registry)(on_child)

    if autoscaler is None:
        return

    @kopf.timer(GROUP, VERSION, PLURAL, interval=autoscale_interval, registry=registry)
    def on_autoscale(body, **_):
        body = dict(body)
        spec = EPDDeploymentSpec.from_resource(body["spec"], reconciler.default_image)
        outcome = autoscaler.tick(body, spec)
        if outcome is None:
            return
        patch = scaling_status(outcome, spec, body.get("status") or {})
        if not outcome.decisions:
            meta = body["metadata"]
            reconciler.cluster.patch_status(meta["name"], meta["namespace"], patch)
            return
        reconciler.reconcile(body, status_patch=patch)
        kopf.info(body, reason="Scaled", message="; ".join(f"{d.stage} {d.current} -> {d.desired}: {d.reason}"
                                                           for d in outcome.decisions))

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def on_deployment_event(event, body, **_):
        if event["type"] == "DELETED":
            autoscaler.forget(body["metadata"]["uid"])
