"""Per-EPDDeployment scaling: once per window, build the observed window (from
two readings of every pod's /metrics, or from PromQL against a Prometheus
server) and let a StageScaler (kept across windows for its cooldowns and
stabilisation) decide."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from epd.slo import SLO
from epd.stages import STAGES

from ..cluster import Cluster
from ..naming import METRICS_PORT, Owner, child_name, owned_selector, selector
from ..sizing.architectures import get_architecture
from ..sizing.hardware import get_hardware
from ..sizing.perfmodel import roofline
from ..sizing.scaling import ObservedWindow, PolicyConfig, ScalingDecision, StageScaler
from ..spec import EPDDeploymentSpec
from .prom import Reading, scrape
from .promql import MetricsUnavailable, Prometheus, Queries, prometheus_window
from .window import StageState, observe

log = logging.getLogger(__name__)
WORKER_DEFAULT_DECODE_BATCH = 64  # `epd worker --decode-max-batch` default


@dataclass
class Outcome:
    window: ObservedWindow
    decisions: list[ScalingDecision]


@dataclass
class Tracked:
    """What the scaler of one EPDDeployment keeps between windows."""

    spec: EPDDeploymentSpec
    scaler: StageScaler
    readings: dict[str, dict[str, Reading]]  # the direct source's last reading of every pod
    taken: float


def policy(spec: EPDDeploymentSpec) -> PolicyConfig:
    scaling = spec.autoscaling
    stages = spec.stages
    return PolicyConfig(
        slo=SLO(spec.slo.ttft_seconds, spec.slo.tpot_seconds),
        min_replicas={s: stages[s].min_replicas for s in STAGES},
        max_replicas={s: stages[s].max_replicas for s in STAGES},
        gpu_budget=scaling.max_total_replicas,
        up_cooldown=scaling.cooldown_seconds, down_cooldown=scaling.cooldown_seconds,
        down_stabilization=max(scaling.cooldown_seconds, scaling.window_seconds),
        warmup=0.0,  # the first window only starts the counters: it is never acted on
        decode_batch=stages["decode"].max_batch or WORKER_DEFAULT_DECODE_BATCH)


@dataclass
class Autoscaler:
    cluster: Cluster
    clock: Callable[[], float] = time.monotonic
    read: Callable[[str], Reading | None] = scrape
    prometheus: Prometheus | None = None  # the operator's own server (--prometheus-url), with its token
    tracked: dict[str, Tracked] = field(default_factory=dict)  # EPDDeployment uid -> state

    def tick(self, body: dict[str, Any], spec: EPDDeploymentSpec) -> Outcome | None:
        """One look at a deployment: None until a whole window has passed since the last one.
        Raises MetricsUnavailable when the metrics source cannot be asked."""
        meta = body["metadata"]
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        if not spec.autoscaling.enabled:
            self.tracked.pop(owner.uid, None)
            return None
        now = self.clock()
        state = self.tracked.get(owner.uid)
        if state is not None and now - state.taken < spec.autoscaling.window_seconds:
            return None
        direct = spec.autoscaling.metrics_source == "direct"
        readings = self.readings(owner, spec) if direct else {}
        if state is None or state.spec != spec:  # new, or its spec changed: start a fresh baseline
            model = (roofline(get_architecture(spec.autoscaling.architecture), get_hardware(spec.autoscaling.hardware))
                     if spec.autoscaling.architecture else None)
            self.tracked[owner.uid] = Tracked(spec, StageScaler(model, policy(spec), started=now), readings, now)
            return None
        before, before_time = state.readings, state.taken
        state.readings, state.taken = readings, now
        states = self.stage_states(owner)
        decode_batch = state.scaler.config.decode_batch
        if direct:
            window = self.direct_window(owner, before, readings, now - before_time, now, states, decode_batch, spec)
        else:
            queries = Queries(owner.namespace, owner.name, spec.autoscaling.window_seconds)
            window = prometheus_window(self.prometheus_for(spec), queries, now, states, decode_batch,
                                       spec.slo.percentile)
        if window is None:  # never act on missing data: no metrics would read as no load
            log.warning("%s/%s: no metrics from some pods; not scaling this window", owner.namespace, owner.name)
            return None
        return Outcome(window, state.scaler.decide(window))

    def direct_window(self, owner: Owner, before: dict[str, Any], after: dict[str, Any], seconds: float, now: float,
                      states: dict[str, StageState], decode_batch: int, spec: EPDDeploymentSpec) -> ObservedWindow | None:
        silent = [role for role, pods in after.items() if not pods and (role == "router" or states[role].ready)]
        if silent:
            return None
        return observe(before, after, seconds, now, states, decode_batch, spec.slo.percentile)

    def prometheus_for(self, spec: EPDDeploymentSpec) -> Prometheus:
        """The spec's server, or the operator's; only the operator's own server gets its bearer token
        (a token must never go to a URL a user of the cluster chose)."""
        url = spec.autoscaling.prometheus_url
        if self.prometheus is not None and url in ("", self.prometheus.url):
            return self.prometheus
        if not url:
            raise MetricsUnavailable("metricsSource is prometheus but neither autoscaling.prometheus.url nor the "
                                     "operator's --prometheus-url is set")
        return Prometheus(url)

    def forget(self, uid: str) -> None:
        self.tracked.pop(uid, None)

    def readings(self, owner: Owner, spec: EPDDeploymentSpec) -> dict[str, dict[str, Reading]]:
        """The /metrics of every running pod of the router and of each stage, by pod name."""
        ports: dict[str, int] = {"router": spec.router.metrics_port, **{stage: METRICS_PORT for stage in STAGES}}
        out: dict[str, dict[str, Reading]] = {}
        for role, port in ports.items():
            out[role] = {}
            for pod in self.cluster.list_pods(owner.namespace, selector(owner, role)):
                ip = pod.get("status", {}).get("podIP")
                if pod.get("status", {}).get("phase") != "Running" or not ip:
                    continue
                reading = self.read(f"http://{ip}:{port}/metrics")
                if reading is not None:
                    out[role][pod["metadata"]["name"]] = reading
        return out

    def stage_states(self, owner: Owner) -> dict[str, StageState]:
        found = {sts["metadata"]["name"]: sts
                 for sts in self.cluster.list_objects("apps/v1", "StatefulSet", owner.namespace, owned_selector(owner))}
        states: dict[str, StageState] = {}
        for stage in STAGES:
            sts = found.get(child_name(owner, stage), {})
            states[stage] = StageState(replicas=sts.get("spec", {}).get("replicas", 0),
                                       ready=sts.get("status", {}).get("readyReplicas", 0) or 0)
        return states
