"""The operator's autoscaling, pure parts: Prometheus readings -> observed
window (with the workers' real metric definitions), the PromQL of the
Prometheus source, and the policy the spec implies."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from epd.operator.autoscale.controller import Autoscaler, policy
from epd.operator.autoscale.prom import Reading
from epd.operator.autoscale.promql import MetricsUnavailable, Prometheus, Queries
from epd.operator.autoscale.window import StageState, observe
from epd.operator.spec import EPDDeploymentSpec
from epd.stages import STAGES
from epd.workers import metrics


def reading() -> Reading:
    return Reading.parse(generate_latest().decode())


def test_two_readings_make_the_window_the_policy_reads():
    for stage in STAGES:
        metrics.QUEUE_DEPTH.labels(stage).set(0)
        metrics.IN_FLIGHT.labels(stage).set(0)
    before = reading()
    metrics.REQUESTS.labels("ok").inc(10)
    metrics.IMAGES.inc(40)
    metrics.PROMPT_TOKENS.inc(5000)
    metrics.COMPLETION_TOKENS.inc(1000)
    for _ in range(10):
        metrics.TTFT.observe(0.3)
        metrics.TPOT.observe(0.2)
        metrics.STAGE_LATENCY.labels("encode").observe(0.04)
    metrics.BUSY_SECONDS.labels("encode").inc(1.5)
    metrics.QUEUE_DEPTH.labels("encode").set(7)
    metrics.KV_USAGE.set(0.95)
    metrics.IN_FLIGHT.labels("decode").set(3)
    after = reading()
    roles = ("router", "encode", "prefill", "decode")
    states = {"encode": StageState(1, 1), "prefill": StageState(1, 1), "decode": StageState(2, 1)}
    window = observe({role: {"pod-0": before} for role in roles}, {role: {"pod-0": after} for role in roles},
                     seconds=2.0, now=100.0, states=states, decode_batch=4, percentile=90)
    assert (window.arrival_rate, window.images_per_request, window.prompt_tokens, window.output_tokens) == \
        (5.0, 4.0, 500.0, 100.0)
    assert window.ttft_p90 == pytest.approx(0.25 + 0.25 * 0.9)  # all in the (0.25, 0.5] bucket
    assert window.tpot_p90 == pytest.approx(0.1 + 0.15 * 0.9)  # all in (0.1, 0.25]
    encode, decode = window.stages["encode"], window.stages["decode"]
    assert (encode.busy, encode.queue, encode.latency) == (0.75, 7, pytest.approx(0.025 + 0.025 * 0.9))
    assert (decode.replicas, decode.pending, decode.kv_usage, decode.occupancy) == (2, 1, 0.95, 3 / 8)


def test_a_pod_seen_once_counts_from_its_second_reading_and_a_reset_counts_all_it_has():
    before = Reading({("epd_requests_total", (("outcome", "ok"),)): 50.0})
    after = Reading({("epd_requests_total", (("outcome", "ok"),)): 4.0})  # the pod restarted
    new = Reading({("epd_requests_total", (("outcome", "ok"),)): 9.0})
    states = {s: StageState(1, 1) for s in STAGES}
    window = observe({"router": {"a": before}}, {"router": {"a": after, "b": new}}, 1.0, 1.0, states, 4, 90)
    assert window.arrival_rate == 4.0


def deployment(**autoscaling) -> EPDDeploymentSpec:
    return EPDDeploymentSpec.from_resource({"model": {"name": "tiny-llava"},
                                            "decode": {"replicas": 2, "minReplicas": 1, "maxReplicas": 5},
                                            "autoscaling": autoscaling}, "epd:1")


def test_the_policy_follows_the_spec():
    config = policy(deployment(enabled=True, windowSeconds=30, cooldownSeconds=45, maxTotalReplicas=6))
    assert (config.min_replicas["decode"], config.max_replicas["decode"]) == (1, 5)
    assert (config.up_cooldown, config.down_cooldown, config.down_stabilization) == (45, 45, 45)
    assert config.gpu_budget == 6 and config.warmup == 0 and config.decode_batch == 64
    assert (config.slo.ttft_seconds, config.slo.tpot_seconds) == (2.0, 0.1)


def test_the_prometheus_source_asks_for_the_same_quantities_in_promql():
    queries = Queries("prod", "llava", 60)
    assert queries.select("decode", stage="decode") == \
        '{namespace="prod",epd_deployment="llava",epd_component="decode",stage="decode"}'
    assert queries.increase("epd_requests_total", "router") == \
        'sum(increase(epd_requests_total{namespace="prod",epd_deployment="llava",epd_component="router"}[60s]))'
    assert queries.quantile(0.9, "epd_request_ttft_seconds", "router") == (
        'histogram_quantile(0.9, sum by (le) (rate(epd_request_ttft_seconds_bucket'
        '{namespace="prod",epd_deployment="llava",epd_component="router"}[60s])))')
    assert queries.busy("encode") == ('avg(rate(epd_stage_busy_seconds_total'
                                      '{namespace="prod",epd_deployment="llava",epd_component="encode",'
                                      'stage="encode"}[60s]))')


def test_only_the_operators_own_prometheus_gets_its_token():
    scaler = Autoscaler(cluster=None, prometheus=Prometheus("http://prom.monitoring:9090", "/var/run/token"))
    assert scaler.prometheus_for(deployment(enabled=True, metricsSource="prometheus")).token_file == "/var/run/token"
    chosen = scaler.prometheus_for(deployment(enabled=True, metricsSource="prometheus",
                                              prometheus={"url": "http://elsewhere:9090"}))
    assert (chosen.url, chosen.token_file) == ("http://elsewhere:9090", "")
    with pytest.raises(MetricsUnavailable, match="--prometheus-url"):
        Autoscaler(cluster=None).prometheus_for(deployment(enabled=True, metricsSource="prometheus"))
