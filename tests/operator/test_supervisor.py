"""The operator-wide loop's scheduling: what triggers a reconcile, how bursts
coalesce, back-off after failures, and the quick re-check of a missing Secret.
(The reconciler here is a stand-in recording calls; the real one runs against
the apiserver in e2e/.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from epd.operator.autoscale.controller import Autoscaler
from epd.operator.reconcile import Reconciler, ReconcileResult
from epd.operator.supervisor import MAX_BACKOFF, SECRET_RECHECK, Supervisor


@dataclass
class Events:
    posted: list[tuple[str, str]] = field(default_factory=list)

    def post_event(self, body, kind, reason, message) -> None:
        self.posted.append((kind, reason))


@dataclass
class StandIn:
    results: list = field(default_factory=list)  # what each call returns (or raises)
    calls: int = 0
    cluster: Events = field(default_factory=Events)
    default_image: str = "img"

    def reconcile(self, body, status_patch=None) -> ReconcileResult:
        self.calls += 1
        outcome = self.results.pop(0) if self.results else ReconcileResult()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class IdleAutoscaler:
    def tick(self, body, spec):
        return None

    def forget(self, uid) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def body(generation: int = 1) -> dict:
    return {"metadata": {"uid": "u1", "name": "d", "namespace": "ns", "generation": generation},
            "spec": {"model": {"name": "m"}}}


def supervisor(*results) -> tuple[Supervisor, StandIn, Clock]:
    clock, stand_in = Clock(), StandIn(list(results))
    return Supervisor(cast(Reconciler, stand_in), autoscaler=cast(Autoscaler, IdleAutoscaler()), drift_interval=30.0, autoscale_interval=1e9, clock=clock), \
        stand_in, clock


def test_a_new_deployment_is_reconciled_once_and_then_at_the_drift_interval():
    loop, stand_in, clock = supervisor()
    loop.observe(None, body())
    loop.step()
    loop.step()
    assert stand_in.calls == 1
    loop.observe("MODIFIED", body())  # a status update: same generation, nothing to do
    loop.step()
    assert stand_in.calls == 1
    clock.now += 30.0
    loop.step()
    assert stand_in.calls == 2


def test_a_burst_of_child_events_is_one_reconcile_and_a_new_generation_is_another():
    loop, stand_in, _ = supervisor()
    loop.observe(None, body())
    loop.step()
    for _ in range(5):
        loop.request("u1")
    loop.request("someone-else")  # not an EPDDeployment we know
    loop.step()
    assert stand_in.calls == 2
    loop.observe("MODIFIED", body(generation=2))
    loop.step()
    assert stand_in.calls == 3


def test_failures_back_off_and_success_resets():
    failing = ReconcileResult(degraded="ApplyFailed", message="x", retry=True)
    loop, stand_in, clock = supervisor(failing, failing, failing, RuntimeError("bug"), ReconcileResult())
    loop.observe(None, body())
    waits = []
    for _ in range(5):
        start = clock.now
        loop.step()
        waits.append(loop.due["u1"] - start)
        clock.now = loop.due["u1"]
    assert waits == [1.0, 2.0, 4.0, 8.0, 30.0]
    assert stand_in.calls == 5
    assert stand_in.cluster.posted == [("Warning", "ApplyFailed")] * 3 + [("Warning", "ReconcileError")]

    loop.due["u1"], loop.failures["u1"] = 0.0, 20  # a long outage: the wait stops growing
    stand_in.results = [failing]
    loop.step()
    assert loop.due["u1"] - clock.now == MAX_BACKOFF


def test_a_missing_secret_is_looked_for_again_soon_and_deletion_forgets():
    loop, stand_in, clock = supervisor(ReconcileResult(degraded="SecretNotFound", waiting=True))
    loop.observe(None, body())
    loop.step()
    assert loop.due["u1"] == clock.now + SECRET_RECHECK
    loop.observe("DELETED", body())
    clock.now += 60
    loop.step()
    assert stand_in.calls == 1 and "u1" not in loop.due
