"""Two readings of every pod -> the ObservedWindow the scaling policy reads.
Pure: readings in, window out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from epd import metric_names as names
from epd.percentiles import histogram_percentile
from epd.stages import STAGES

from ..sizing.scaling import ObservedWindow, StageMetrics
from .prom import Reading

PodReadings = Mapping[str, Reading]  # pod name -> reading


@dataclass(frozen=True)
class StageState:
    replicas: int  # desired replicas of the StatefulSet
    ready: int


def counter_delta(before: PodReadings, after: PodReadings, name: str, **labels: str) -> float:
    """Increase over the window, summed over pods seen both times; a counter that went down was
    reset by a restart, so its whole current value is new."""
    total = 0.0
    for pod, reading in after.items():
        if pod in before:
            now, then = reading.total(name, **labels), before[pod].total(name, **labels)
            total += now - then if now >= then else now
    return total


def bucket_delta(before: PodReadings, after: PodReadings, name: str, **labels: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for pod, reading in after.items():
        if pod not in before:
            continue
        then = before[pod].buckets(name, **labels)
        for bound, count in reading.buckets(name, **labels).items():
            out[bound] = out.get(bound, 0.0) + max(0.0, count - then.get(bound, 0.0))
    return out


def gauge_sum(readings: PodReadings, name: str, **labels: str) -> float:
    return sum(r.total(name, **labels) for r in readings.values())


def observe(before: Mapping[str, PodReadings], after: Mapping[str, PodReadings], seconds: float, now: float,
            states: Mapping[str, StageState], decode_batch: int, percentile: float) -> ObservedWindow:
    """The window between two readings of the router pods (`router`) and each stage's pods."""
    router_before, router_after = before.get("router", {}), after.get("router", {})
    requests = counter_delta(router_before, router_after, names.REQUESTS)
    per_request = max(requests, 1.0)
    stages: dict[str, StageMetrics] = {}
    for stage in STAGES:
        old, new = before.get(stage, {}), after.get(stage, {})
        state = states[stage]
        queue = gauge_sum(new, names.STAGE_QUEUE_DEPTH, stage=stage)
        busy = counter_delta(old, new, names.STAGE_BUSY_SECONDS, stage=stage) / (seconds * max(1, len(new)))
        latency = histogram_percentile(bucket_delta(old, new, names.STAGE_LATENCY, stage=stage), percentile)
        kv_usage = gauge_sum(new, names.KV_CACHE_USAGE) / len(new) if stage == "decode" and new else 0.0
        occupancy = ((gauge_sum(new, names.STAGE_IN_FLIGHT, stage=stage) + queue)
                     / (max(1, state.replicas) * decode_batch)) if stage == "decode" else 0.0
        stages[stage] = StageMetrics(replicas=state.replicas, pending=max(0, state.replicas - state.ready),
                                     queue=int(queue), busy=min(1.0, busy), latency=latency, kv_usage=kv_usage,
                                     occupancy=occupancy)
    return ObservedWindow(
        time=now, seconds=seconds, arrival_rate=requests / seconds,
        images_per_request=counter_delta(router_before, router_after, names.REQUEST_IMAGES) / per_request,
        prompt_tokens=counter_delta(router_before, router_after, names.PROMPT_TOKENS) / per_request,
        output_tokens=counter_delta(router_before, router_after, names.COMPLETION_TOKENS) / per_request,
        ttft_p90=histogram_percentile(bucket_delta(router_before, router_after, names.REQUEST_TTFT), percentile),
        tpot_p90=histogram_percentile(bucket_delta(router_before, router_after, names.REQUEST_TPOT), percentile),
        stages=stages)
