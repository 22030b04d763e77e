"""Scaling decisions on synthetic metric series."""

from __future__ import annotations

import math

from epd.operator.sizing.scaling import (
    ObservedWindow,
    PolicyConfig,
    StageMetrics,
    StageScaler,
    predictive_floor,
)
from epd.slo import SLO

from .scenarios import LLAVA_A100

SLO_ = SLO(2.0, 0.05)


def window(t: float, ttft: float = 1.0, tpot: float = 0.02, rate: float = 1.0, **stages: StageMetrics) -> ObservedWindow:
    base = {"encode": StageMetrics(2, busy=0.5), "prefill": StageMetrics(2, busy=0.5),
            "decode": StageMetrics(2, busy=0.9, occupancy=0.4, kv_usage=0.3)}
    return ObservedWindow(t, 10.0, rate, 2.0, 1200, 64, ttft, tpot, {**base, **stages})


def scaler(**overrides) -> StageScaler:
    return StageScaler(LLAVA_A100, PolicyConfig(slo=SLO_, warmup=0, **overrides))


def test_ttft_breach_from_encode_backlog_scales_encode_not_decode():
    decisions = scaler().decide(window(100, ttft=4.0, encode=StageMetrics(2, queue=80, busy=0.98)))
    stages = {d.stage: d for d in decisions}
    assert stages["encode"].desired > 2 and "TTFT" in stages["encode"].reason
    assert "decode" not in stages and "prefill" not in stages


def test_tpot_breach_scales_decode():
    decisions = scaler().decide(window(100, tpot=0.09, decode=StageMetrics(2, busy=1.0, occupancy=0.8)))
    assert [(d.stage, d.desired > d.current) for d in decisions] == [("decode", True)]


def test_no_step_while_pods_are_pending():
    decisions = scaler().decide(window(100, ttft=4.0, encode=StageMetrics(3, pending=1, queue=80, busy=0.98)))
    assert "encode" not in {d.stage for d in decisions}


def test_no_scale_down_that_overloads_the_survivors():
    s = scaler()
    for t in range(0, 600, 10):  # long quiet period: 2 prefill replicas at 45% busy each
        decisions = s.decide(window(t, prefill=StageMetrics(2, busy=0.45)))
        assert "prefill" not in {d.stage for d in decisions}  # 1 replica would be at 90% > target


def test_oscillating_load_causes_a_bounded_number_of_changes():
    s = scaler()
    changes = []
    replicas = 2
    for i, t in enumerate(range(0, 3600, 10)):
        work = 1.6 if i % 2 else 1.2  # busy-replicas of encode work, around 2 x the 70% target
        decisions = s.decide(window(t, encode=StageMetrics(replicas, busy=min(1.0, work / replicas))))
        for d in decisions:
            if d.stage == "encode":
                changes.append(d)
                replicas = d.desired
    assert len(changes) <= 2


def test_scale_down_after_the_load_is_gone():
    s = scaler()
    desired = 8
    for t in range(0, 1200, 10):
        for d in s.decide(window(t, rate=0.2, encode=StageMetrics(desired, busy=0.05))):
            if d.stage == "encode":
                assert d.desired < d.current and d.current - d.desired <= max(1, d.current // 4)
                desired = d.desired
    assert desired <= 2


def test_min_max_and_budget_are_respected():
    s = scaler(max_replicas={"encode": 3, "prefill": 8, "decode": 8}, gpu_budget=6)
    decisions = s.decide(window(100, ttft=9.0, encode=StageMetrics(2, queue=500, busy=1.0)))
    planned = {"encode": 2, "prefill": 2, "decode": 2} | {d.stage: d.desired for d in decisions}
    assert planned["encode"] <= 3 and sum(planned.values()) <= 6


def test_decode_floor_covers_the_kv_the_decoding_sequences_hold():
    config = PolicyConfig(slo=SLO_, warmup=0)
    # long prompts and outputs: what decoding sequences hold, not the step time, sets decode's replicas
    busy = window(100, rate=2.0, decode=StageMetrics(2, busy=0.9, occupancy=0.4, kv_usage=0.3))
    busy = ObservedWindow(busy.time, busy.seconds, 2.0, 6.0, 3500, 1000, 1.0, 0.02, busy.stages)
    batch = min(config.decode_batch, math.ceil(2.0 * 1000 * SLO_.tpot_seconds))
    step = LLAVA_A100.costs.decode_time(batch, batch * 4000)
    held = 2.0 * 1000 * step * 4000  # sequences decoding at once x their mean context
    capacity = LLAVA_A100.kv_capacity_tokens(config.decode_batch)
    floor = predictive_floor(busy, LLAVA_A100, config)["decode"]
    assert (floor - 1) * capacity * 0.9 < held <= floor * capacity * 0.9
    assert floor > math.ceil(2.0 * 1000 * step / batch / config.target_busy)  # more than compute alone asks
