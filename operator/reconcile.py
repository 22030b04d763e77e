"""One reconcile for every trigger (a spec change, a child's change, the drift
loop, a retry, the autoscaler's choice): see the children as they are (one
list per kind), create the generated Secrets once, set each stage's EPDStage,
apply the children, prune what the spec no longer builds, and always report
status, also when a step fails."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes.client.rest import ApiException

from epd.stages import STAGES

from . import epdstage, redis, tls
from .builders import CHILD_KINDS, PRUNABLE, Facts, build_children, endpoint
from .cluster import FIELD_MANAGER, Cluster, api_message
from .crd import KIND
from .naming import Owner, child_name, owned_selector, selector
from .network import MetricsReaders
from .podreport import pod_problems
from .spec import EPDDeploymentSpec
from .status import WorkloadState, compute_status

log = logging.getLogger(__name__)
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)
Children = dict[tuple[str, str], dict[str, Any]]  # (kind, name) -> object


@dataclass
class ReconcileResult:
    changed: list[str] = field(default_factory=list)  # "Kind/name" of children created or corrected
    pruned: list[str] = field(default_factory=list)
    scaled: list[str] = field(default_factory=list)  # EPDStage writes, with why
    degraded: str = ""
    message: str = ""
    retry: bool = False  # a call failed: try again with back-off
    waiting: bool = False  # a named Secret is missing: look again soon

    def fail(self, reason: str, message: str, retry: bool) -> None:
        self.degraded, self.message, self.retry = reason, message, retry


@dataclass
class Reconciler:
    cluster: Cluster
    default_image: str
    readers: MetricsReaders = field(default_factory=lambda: MetricsReaders("epd-system"))

    def reconcile(self, body: dict[str, Any], status_patch: dict[str, Any] | None = None) -> ReconcileResult:
        """Reconcile the deployment as it is now (the triggering body may be stale), after recording
        `status_patch` (the autoscaler's choice)."""
        meta = body["metadata"]
        if status_patch:
            self.cluster.patch_status(meta["name"], meta["namespace"], status_patch)
        current = self.cluster.get_deployment(meta["name"], meta["namespace"])
        if current is None or current["metadata"].get("deletionTimestamp"):
            return ReconcileResult()  # going away: garbage collection removes the children
        return self._reconcile(current)

    def _reconcile(self, body: dict[str, Any]) -> ReconcileResult:
        meta = body["metadata"]
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        spec = EPDDeploymentSpec.from_resource(body["spec"], self.default_image)
        status = body.get("status") or {}
        result, records, children = ReconcileResult(), dict[str, dict[str, Any]](), Children()
        replicas: dict[str, int] = {stage: spec.stages[stage].replicas for stage in STAGES}
        try:
            children = self._children(owner)
            missing = [name for name in spec.secrets() if not self.cluster.secret_exists(name, owner.namespace)]
        except API_ERRORS as exc:
            result.fail("ReadFailed", f"cannot read the children: {api_message(exc)}", retry=True)
            missing = []
        if missing:
            result.fail("SecretNotFound", f"Secret {', '.join(missing)} not found in namespace {owner.namespace}",
                        retry=False)
            result.waiting = True
        elif not result.degraded:
            replicas = self._converge(owner, spec, status, children, result, records)
        patch = self._status(body, owner, spec, replicas, children, result)
        _merge(patch, records)
        if _differs(patch, status):
            try:
                self.cluster.patch_status(owner.name, owner.namespace, patch)
            except API_ERRORS as exc:
                log.warning("%s/%s: status not written: %s", owner.namespace, owner.name, api_message(exc))
                result.retry = True
        return result

    def _children(self, owner: Owner) -> Children:
        found: Children = {}
        for api_version, kind in CHILD_KINDS:
            if self.cluster.serves(api_version, kind):
                for obj in self.cluster.list_objects(api_version, kind, owner.namespace, owned_selector(owner)):
                    found[(kind, obj["metadata"]["name"])] = obj
        return found

    def _converge(self, owner: Owner, spec: EPDDeploymentSpec, status: dict[str, Any], children: Children,
                  result: ReconcileResult, records: dict[str, Any]) -> dict[str, int]:
        """Every write, stopping at the first refusal, which then names the object and the apiserver's
        words. `children` is updated with what the apiserver returned."""
        replicas: dict[str, int] = {stage: spec.stages[stage].replicas for stage in STAGES}
        doing = "reading the cluster"
        try:
            provider = self._tls_provider(spec)
            if spec.tls.enabled and not provider:
                result.fail("CertManagerMissing", "tls.provider is cert-manager (or an issuerRef is set) but the "
                            "cert-manager.io CRDs are not installed", retry=False)
                return replicas
            doing = f"Secret/{tls.secret_name(owner)}"
            self._secrets(owner, spec, provider, result, records)
            doing = f"Secret/{redis.auth_secret_name(owner)}"
            if spec.cache.managed_redis and self.cluster.create(redis.auth_secret(owner)):
                result.changed.append(doing)
            for stage in STAGES:
                doing = f"EPDStage/{child_name(owner, stage)}"
                replicas[stage] = self._stage_replicas(owner, spec, stage, status, children, result, records)
            built = set()
            for child in build_children(owner, spec, Facts(replicas, provider or "operator", self.readers)):
                key = (child["kind"], child["metadata"]["name"])
                doing = "/".join(key)
                built.add(key)
                before = children.get(key)
                children[key] = self.cluster.apply(child)
                if before is None or _ours(before) != _ours(children[key]):
                    result.changed.append(doing)
            doing = "pruning"
            self._prune(owner, children, built, result)
            for stage in STAGES:
                doing = f"EPDStage/{child_name(owner, stage)} status"
                self._stage_status(owner, stage, children)
        except API_ERRORS as exc:
            result.fail("ApplyFailed", f"{doing}: {api_message(exc)}", retry=True)
        return replicas

    def _tls_provider(self, spec: EPDDeploymentSpec) -> str:
        """"operator", "cert-manager", or "" when cert-manager is required and absent."""
        if not spec.tls.enabled:
            return ""
        installed = self.cluster.serves(tls.CERT_MANAGER, "Certificate")
        if spec.tls.provider == "cert-manager" or spec.tls.issuer_name:
            return "cert-manager" if installed else ""
        return "cert-manager" if spec.tls.provider == "auto" and installed else "operator"

    def _secrets(self, owner: Owner, spec: EPDDeploymentSpec, provider: str, result: ReconcileResult,
                 records: dict[str, Any]) -> None:
        """Issue the deployment's CA and certificate unless its Secret exists (deleting it rotates them:
        the workers re-read the files); what was issued is recorded in status."""
        if not spec.tls.enabled:
            return
        if provider == "cert-manager":
            records["tls"] = {"secretName": tls.secret_name(owner), "issuedBy": "cert-manager"}
            return
        issued = tls.issue(owner)
        if self.cluster.create(issued.body):
            result.changed.append(f"Secret/{tls.secret_name(owner)}")
            records["tls"] = {"secretName": tls.secret_name(owner), "issuedBy": "operator",
                              "serial": issued.serial, "notAfter": issued.not_after}

    def _stage_replicas(self, owner: Owner, spec: EPDDeploymentSpec, stage: str, status: dict[str, Any], children: Children,
                        result: ReconcileResult, records: dict[str, Any]) -> int:
        name = child_name(owner, stage)
        record = status.get("stages", {}).get(stage, {})
        scale = children.get(("EPDStage", name))
        autoscaling = spec.autoscaling.enabled
        decision = epdstage.decide(spec.stages[stage], autoscaling, record, scale,
                                   children.get(("StatefulSet", name)))
        if decision.write:
            if scale is None:
                if not self.cluster.create(epdstage.scale_object(owner, stage, decision.replicas)):
                    self.cluster.scale_stage(name, owner.namespace, decision.replicas)
            else:
                self.cluster.scale_stage(name, owner.namespace, decision.replicas)
                before = scale.get("spec", {}).get("replicas")
                result.scaled.append(f"{stage} {before} -> {decision.replicas} ({decision.write})")
        stage_record: dict[str, Any] = {"declaredReplicas": spec.stages[stage].replicas}
        if autoscaling and decision.write == epdstage.DECLARED:
            stage_record["scaledReplicas"] = decision.replicas  # the user's edit is the scaler's new start
        elif not autoscaling and "scaledReplicas" in record:
            stage_record["scaledReplicas"] = None  # a stale choice must not win when scaling is turned on again
        records.setdefault("stages", {})[stage] = stage_record
        return decision.replicas

    def _prune(self, owner: Owner, children: Children, built: set[tuple[str, str]], result: ReconcileResult) -> None:
        """Delete what this owner made that the spec no longer builds (never anything else: the label
        selector, the controller reference's uid and a uid precondition all must match)."""
        prunable = {kind: api_version for api_version, kind in PRUNABLE}
        for (kind, name), obj in list(children.items()):
            controller = [r for r in obj["metadata"].get("ownerReferences") or []
                          if r.get("controller") and r.get("kind") == KIND and r.get("uid") == owner.uid]
            if kind in prunable and controller and (kind, name) not in built:
                self.cluster.delete(prunable[kind], kind, name, owner.namespace, obj["metadata"]["uid"])
                del children[(kind, name)]
                result.pruned.append(f"{kind}/{name}")

    def _stage_status(self, owner: Owner, stage: str, children: Children) -> None:
        name = child_name(owner, stage)
        scale = children[("EPDStage", name)]
        wanted = epdstage.status(owner, stage, scale, children.get(("StatefulSet", name)))
        if _differs(wanted, scale.get("status") or {}):
            self.cluster.patch_stage_status(name, owner.namespace, wanted)

    def _status(self, body: dict[str, Any], owner: Owner, spec: EPDDeploymentSpec, replicas: dict[str, int],
                children: Children, result: ReconcileResult) -> dict[str, Any]:
        stages: dict[str, WorkloadState] = {stage: WorkloadState.of(children.get(("StatefulSet", child_name(owner, stage))), replicas[stage])
                  for stage in STAGES}
        router = WorkloadState.of(children.get(("Deployment", child_name(owner, "router"))), spec.router.replicas)
        try:
            problems: dict[str, str] = {stage: pod_problems(self.cluster.list_pods(owner.namespace, selector(owner, stage)))
                        for stage, state in stages.items() if not state.is_ready}
        except API_ERRORS as exc:
            log.warning("%s/%s: pods not readable: %s", owner.namespace, owner.name, api_message(exc))
            problems = {}
        return compute_status(body["metadata"].get("generation", 0), stages, router, endpoint(owner, spec),
                              body.get("status") or {}, result.degraded, result.message,
                              spec.autoscaling.enabled, problems)


def _ours(obj: dict[str, Any]) -> tuple[Any, list[tuple[Any, Any]]]:
    """What only our own writes move: the spec generation and our apply's managed-fields entry. (The
    resourceVersion also moves with every status update by the controllers, so it cannot tell.)"""
    meta = obj["metadata"]
    entries = [(m.get("time"), m.get("fieldsV1")) for m in meta.get("managedFields") or []
               if m.get("manager") == FIELD_MANAGER and m.get("operation") == "Apply"]
    return meta.get("generation"), entries


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _differs(patch: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a merge patch would change `current` (None deletes a key)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            if _differs(value, current[key]):
                return True
        elif value is None:
            if key in current:
                return True
        elif current.get(key) != value:
            return True
    return False
