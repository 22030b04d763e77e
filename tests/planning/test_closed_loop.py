"""The scaling policy closed-loop in the simulator."""

from __future__ import annotations

from epd.operator.sizing.closed_loop import run_closed_loop
from epd.operator.sizing.results import simulate
from epd.operator.sizing.scaling import PolicyConfig, StageScaler, UtilisationScaler
from epd.operator.sizing.simulator import ServingConfig
from epd.slo import SLO

from .scenarios import BURSTY_SLO, LLAVA_A100, MINICPM_A100, bursty_trace, role_switch_trace


def test_bursty_trace_meets_the_slo_with_far_fewer_gpu_seconds_than_static_peak():
    requests = bursty_trace()
    peak = simulate(LLAVA_A100, ServingConfig("epd", 6, 2, 2), requests, BURSTY_SLO)  # sized for the bursts
    config = PolicyConfig(slo=BURSTY_SLO, encode_image=(2048, 1536), startup_delay=20)
    slo_aware = run_closed_loop(LLAVA_A100, ServingConfig("epd", 2, 1, 1), requests, BURSTY_SLO,
                                StageScaler(LLAVA_A100, config), interval=5, startup_delay=20)
    hpa = run_closed_loop(LLAVA_A100, ServingConfig("epd", 2, 1, 1), requests, BURSTY_SLO,
                          UtilisationScaler(config), interval=5, startup_delay=20)
    print(f"static peak: attainment {peak['slo_attainment']:.3f}, {peak['gpu_seconds']:.0f} GPU-s; "
          f"SLO-aware: {slo_aware['slo_attainment']:.3f}, {slo_aware['gpu_seconds']:.0f} GPU-s; "
          f"utilisation (HPA-like): {hpa['slo_attainment']:.3f}, {hpa['gpu_seconds']:.0f} GPU-s")
    assert peak["slo_attainment"] >= 0.99
    assert slo_aware["slo_attainment"] >= 0.95
    assert slo_aware["gpu_seconds"] <= 0.70 * peak["gpu_seconds"]
    assert hpa["slo_attainment"] < slo_aware["slo_attainment"]


def test_moving_replicas_between_stages_halves_mean_latency_on_a_workload_shift():
    requests = role_switch_trace()
    slo = SLO(3.9, 0.06)
    start = ServingConfig("epd", 5, 1, 2, decode_batch=4)
    static = simulate(MINICPM_A100, start, requests, slo)
    config = PolicyConfig(slo=slo, decode_batch=4, encode_image=(3840, 2160), gpu_budget=8, startup_delay=5,
                          up_cooldown=4, warmup=5)
    switched = run_closed_loop(MINICPM_A100, start, requests, slo, StageScaler(MINICPM_A100, config),
                               interval=2, startup_delay=5)
    assert switched["e2e_s"]["mean"] <= 0.5 * static["e2e_s"]["mean"]
    assert switched["final_replicas"]["decode"] > 2 and switched["final_replicas"]["encode"] < 5
    assert all(sum(1 for _ in h) for h in switched["scaling_history"])
