"""The operator-wide loop. kopf's watch handlers only note what happened
(`observe`, `request`); this one thread does every reconcile and every
autoscaling look, so:

* no per-object timer exists, hence no kopf finalizer: deleting an
  EPDDeployment, its namespace or the CRD never waits for the operator;
* a burst of child events for one owner becomes one reconcile;
* a failed reconcile is retried with exponential back-off (1 s doubling to
  `MAX_BACKOFF`), a deployment waiting for a Secret is looked at every second,
  every other one every `drift_interval` (a safety net: child events revert
  drift at once)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .autoscale.controller import Autoscaler
from .autoscale.promql import MetricsUnavailable
from .autoscale.status import scaling_status
from .cluster import Cluster
from .reconcile import Reconciler, ReconcileResult
from .spec import EPDDeploymentSpec

log = logging.getLogger(__name__)
MAX_BACKOFF = 60.0
SECRET_RECHECK = 0.5


@dataclass
class Supervisor:
    reconciler: Reconciler
    autoscaler: Autoscaler
    drift_interval: float = 30.0
    autoscale_interval: float = 5.0
    clock: Callable[[], float] = time.monotonic
    beat: Callable[[], None] = lambda: None
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> latest EPDDeployment seen
    due: dict[str, float] = field(default_factory=dict)  # uid -> next reconcile
    failures: dict[str, int] = field(default_factory=dict)
    warned: dict[str, str] = field(default_factory=dict)  # uid -> the metrics problem last posted as an Event
    last_autoscale: float = float("-inf")
    wake: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cluster(self) -> Cluster:
        return self.reconciler.cluster

    # ---- called from kopf's watch handlers -------------------------------------------
    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        """An EPDDeployment event: keep its latest body; a new object or a new generation is due now."""
        uid = body["metadata"]["uid"]
        _export_slo(event_type, body)
        with self.lock:
            if event_type == "DELETED":
                self.bodies.pop(uid, None)
                self.due.pop(uid, None)
                self.failures.pop(uid, None)
                self.warned.pop(uid, None)
                self.autoscaler.forget(uid)
            else:
                old = self.bodies.get(uid)
                self.bodies[uid] = body
                if old is None or old["metadata"].get("generation") != body["metadata"].get("generation"):
                    self.due[uid] = 0.0
            metrics.DEPLOYMENTS.set(len(self.bodies))
        self.wake.set()

    def request(self, uid: str) -> None:
        """Something the deployment owns changed: reconcile it now."""
        with self.lock:
            if uid in self.bodies:
                self.due[uid] = 0.0
        self.wake.set()

    # ---- the loop ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.beat()
            try:
                self.step()
            except Exception:  # a bug must not end the loop: log it and go on with the next turn
                log.exception("supervisor step failed")
            self.wake.wait(self._sleep())
            self.wake.clear()

    def _sleep(self) -> float:
        with self.lock:
            soonest = min(self.due.values(), default=self.clock() + self.drift_interval)
        return max(0.0, min(soonest - self.clock(), self.autoscale_interval, 1.0))

    def step(self) -> None:
        now = self.clock()
        with self.lock:
            ready = [uid for uid, when in self.due.items() if when <= now]
        for uid in ready:
            with self.lock:
                body = self.bodies.get(uid)
                self.due[uid] = now + self.drift_interval
            if body is not None:
                self._schedule(uid, self.reconcile(body))
        if now - self.last_autoscale >= self.autoscale_interval:
            self.last_autoscale = now
            with self.lock:
                bodies = list(self.bodies.values())
            for body in bodies:
                self.autoscale(body)

    def _schedule(self, uid: str, result: ReconcileResult) -> None:
        with self.lock:
            if uid not in self.bodies:
                return
            if result.retry:
                failures = self.failures.get(uid, 0) + 1
                self.failures[uid] = failures
                self.due[uid] = self.clock() + min(MAX_BACKOFF, 2.0 ** (failures - 1))
            else:
                self.failures.pop(uid, None)
                if result.waiting:
                    self.due[uid] = self.clock() + SECRET_RECHECK

    def reconcile(self, body: dict[str, Any], status_patch: dict[str, Any] | None = None) -> ReconcileResult:
        """One reconcile with its Events and metrics; an unexpected error becomes a Warning Event
        and a retry, never the end of the loop."""
        started = time.monotonic()
        try:
            result = self.reconciler.reconcile(body, status_patch)
        except Exception as exc:
            log.exception("reconcile of %s/%s failed", body["metadata"]["namespace"], body["metadata"]["name"])
            self.cluster.post_event(body, "Warning", "ReconcileError", f"{type(exc).__name__}: {exc}")
            metrics.RECONCILES.labels("retry").inc()
            return ReconcileResult(retry=True)
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        log.log(logging.INFO if result.changed or result.degraded else logging.DEBUG,
                "reconciled %s/%s in %.2fs: %d changed%s", body["metadata"]["namespace"], body["metadata"]["name"],
                time.monotonic() - started, len(result.changed), f", {result.degraded}" if result.degraded else "")
        metrics.RECONCILES.labels("retry" if result.retry else "degraded" if result.degraded else "ok").inc()
        self._report(body, result)
        return result

    def _report(self, body: dict[str, Any], result: ReconcileResult) -> None:
        post = self.cluster.post_event
        if result.degraded:
            metrics.APPLY_ERRORS.labels(result.degraded).inc()
            post(body, "Warning", result.degraded, result.message)
        if result.changed:
            post(body, "Normal", "Reconciled", f"applied {len(result.changed)} objects: "
                                               f"{', '.join(result.changed[:6])}"
                                               + (" ..." if len(result.changed) > 6 else ""))
        if result.scaled:
            post(body, "Normal", "StageScaled", "; ".join(result.scaled))
        if result.pruned:
            for kind_name in result.pruned:
                metrics.PRUNED.labels(kind_name.split("/")[0]).inc()
            post(body, "Normal", "Pruned", f"deleted {', '.join(result.pruned)} (no longer in the spec)")

    def autoscale(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        try:
            spec = EPDDeploymentSpec.from_resource(body["spec"], self.reconciler.default_image)
            outcome = self.autoscaler.tick(body, spec)
        except MetricsUnavailable as exc:
            if self.warned.get(meta["uid"]) != str(exc):
                self.warned[meta["uid"]] = str(exc)
                self.cluster.post_event(body, "Warning", "MetricsUnavailable", f"not scaling: {exc}")
            return
        except Exception:
            log.exception("autoscaling %s/%s failed", meta["namespace"], meta["name"])
            return
        self.warned.pop(meta["uid"], None)
        if outcome is None:
            return
        patch = scaling_status(outcome, body.get("status") or {})
        if not outcome.decisions:
            self.cluster.patch_status(meta["name"], meta["namespace"], patch)
            return
        for d in outcome.decisions:
            metrics.SCALING_DECISIONS.labels(meta["namespace"], meta["name"], d.stage,
                                             "up" if d.desired > d.current else "down").inc()
        self._schedule(meta["uid"], self.reconcile(body, status_patch=patch))
        self.cluster.post_event(body, "Normal", "Scaled", "; ".join(f"{d.stage} {d.current} -> {d.desired}: {d.reason}"
                                                                   for d in outcome.decisions))


def _export_slo(event_type: str | None, body: dict[str, Any]) -> None:
    meta = body["metadata"]
    slo = EPDDeploymentSpec.from_resource(body["spec"], "").slo  # the defaults too
    for target, seconds in (("ttft", slo.ttft_seconds), ("tpot", slo.tpot_seconds)):
        labels = (meta["namespace"], meta["name"], target)
        if event_type == "DELETED":
            with contextlib.suppress(KeyError):  # never exported
                metrics.SLO_SECONDS.remove(*labels)
        else:
            metrics.SLO_SECONDS.labels(*labels).set(seconds)
