"""Plans in words: which stage bounds a plan's goodput and by what (compute,
memory, or the latency SLO itself), a recommendation's statement, and the
per-stage time and memory breakdown `epd plan --explain` prints."""

from __future__ import annotations

from typing import Any

from epd.slo import SLO

from .planner import Recommendation, ScoredPlan

COMPUTE_BOUND_BUSY = 0.8  # below this, queueing is not what stops the rate: the latency target is
MODE_NAMES = {"epd": "EPD", "bundled": "bundled", "colocated": "colocated"}


def plan_name(plan: ScoredPlan) -> str:
    return f"{MODE_NAMES[plan.config.mode]} {plan.config.label()}"


def bound(plan: ScoredPlan, slo: SLO) -> str:
    """One line: the stage that bounds the plan's goodput, and whether compute, memory or latency does."""
    if plan.problem:
        return f"memory: {plan.problem}"
    summary = plan.summary
    rejected = summary["rejected"] / summary["requests"] if summary["requests"] else 0.0
    if rejected > 1 - slo.attainment or (rejected and not plan.goodput_rps):
        return f"memory: {rejected:.0%} of requests never fit ({next(iter(summary['rejections']))})"
    stages = summary["stages"]
    pressure = {name: (s["busy"], _memory_pressure(name, s)) for name, s in stages.items()}
    name = max(pressure, key=lambda n: max(pressure[n]))
    busy, memory = pressure[name]
    stage = stages[name]
    if memory > busy:
        return (f"{stage['role']} (memory: KV peak {stage['peak_kv_usage']:.0%}, {stage['preemptions']} preemptions, "
                f"{stage['memory_limited_batches']:.0%} of batches kept small, blocked {stage['blocked_on_memory']:.0%} "
                "of the time)")
    if plan.goodput_rps and busy >= COMPUTE_BOUND_BUSY:
        return f"{stage['role']} (compute: {busy:.0%} busy)"
    return _latency(plan, slo)


def _memory_pressure(name: str, stage: dict[str, Any]) -> float:
    """Share of an instance's time memory kept work out: idle while blocked, or (decode) steps run smaller
    than queued work allowed. Smaller encode or prefill batches cost little: those stages are compute-bound."""
    kept_small = stage["memory_limited_batches"] * stage["busy"] if name in ("decode", "colocated") else 0.0
    return min(1.0, float(stage["blocked_on_memory"]) + kept_small)


def _latency(plan: ScoredPlan, slo: SLO) -> str:
    summary = plan.summary
    ttft, tpot = summary["ttft_s"]["p90"], summary["tpot_s"]["p90"]
    phases = summary["phases_s"]
    busiest = max(summary["stages"].values(), key=lambda s: s["busy"])
    load = f"at {busiest['busy']:.0%} busy" if plan.goodput_rps else "even unloaded"
    missed = summary["missed"]
    if missed["tpot"] > missed["ttft"]:
        where = "prefills pausing decode" if plan.config.mode == "colocated" else "decode"
        return (f"{where} (latency: {missed['tpot']} of {summary['requests']} requests miss TPOT {slo.tpot_seconds * 1000:.0f} ms "
                f"{load}; p90 {tpot * 1000:.0f} ms)")
    ttft_phases = {k: v for k, v in phases.items() if k in ("encode", "wait_prefill", "prefill", "encode+prefill")}
    slowest = max(ttft_phases, key=ttft_phases.__getitem__) if ttft_phases else "prefill"
    return (f"{slowest.replace('_', ' for ')} (latency: {missed['ttft']} of {summary['requests']} requests miss TTFT "
            f"{slo.ttft_seconds} s {load}; p90 {ttft:.2f} s; "
            f"{slowest.replace('_', ' for ')} takes {ttft_phases.get(slowest, 0.0):.2f} s)")


def statement(recommendation: Recommendation) -> str:
    """Which mode to run, and by how much it beats the others."""
    best = recommendation.best
    others = [p for p in recommendation.by_mode.values() if p is not best]
    if not best.goodput_rps:
        return "No plan meets the SLOs on this budget: see each mode's bound above."
    runner = max(others, key=lambda p: p.goodput_rps, default=None)
    if runner is None:
        lead = ""
    elif runner.goodput_rps:
        lead = f" ({best.goodput_rps / runner.goodput_rps - 1:.0%} more goodput than {plan_name(runner)})"
    else:
        lead = " (the only mode that meets the SLOs)"
    if best.config.mode == "epd":
        return f"Recommended: {plan_name(best)}{lead}; its EPDDeployment follows."
    epd = recommendation.epd
    versus = (f"{plan_name(epd)}, EPD's best, reaches {epd.goodput_rps:.3f} req/s" if epd and epd.goodput_rps
              else "no EPD plan meets the SLOs" if epd else "EPD needs 3 GPUs or more")
    return (f"Recommended: {plan_name(best)}{lead}. EPD does not win here: {versus}. The operator deploys EPD "
            "only; `--mode epd` plans and prints an EPDDeployment for it.")


def breakdown(plan: ScoredPlan) -> list[str]:
    """Per-stage time and memory of a plan at its goodput, and what memory allows."""
    summary = plan.summary
    if plan.problem or not summary["stages"]:
        return [f"{plan_name(plan)} was not simulated: {plan.problem}"]
    phases = summary["phases_s"]
    lines = [f"{plan_name(plan)} at {plan.goodput_rps:.3f} req/s (its goodput); mean seconds per request: "
             + ", ".join(f"{name.replace('_', ' for ')} {seconds:.3f}" for name, seconds in phases.items())]
    lines.append(f"{'stage':<16}{'GPUs':>5}{'busy':>6}{'batches':>9}{'mean':>7}{'max':>6}{'kept small':>11}{'blocked':>8}"
                 f"{'preempt':>8} | {'weights':>8}{'runtime':>8}{'activ.':>8}{'KV pool':>9}{'KV tokens':>11}"
                 f"{'KV peak':>8}{'peak use':>9}")
    for stage in summary["stages"].values():
        lines.append(f"{stage['role']:<16}{stage['instances']:>5}{stage['busy']:>6.0%}{stage['batches']:>9}"
                     f"{stage['mean_batch']:>7.1f}{stage['largest_batch']:>6}{stage['memory_limited_batches']:>11.0%}"
                     f"{stage['blocked_on_memory']:>8.0%}{stage['preemptions']:>8} | {stage['weights_gb']:>6.1f}GB"
                     f"{stage['runtime_reserve_gb']:>6.1f}GB{stage['activation_gb']:>6.1f}GB{stage['kv_pool_gb']:>7.1f}GB"
                     f"{stage['kv_tokens']:>11,}{stage['peak_kv_usage']:>8.0%}{stage['peak_memory_gb']:>7.1f}GB")
    limits = summary["limits"]
    if limits:
        lines.append(f"memory limits for {limits['image']} images: largest encode batch {limits['largest_encode_batch']:,}, "
                     f"images per request {limits['images_per_request_memory']:,} by memory and "
                     f"{limits['images_per_request_context']:,} by the context window")
    lines.append("activ.: activation room (encode: all memory after the weights; others: the reserve for the "
                 "largest batch the limits admit); kept small: batches (decode: steps) memory kept below the limit "
                 "while work waited; blocked: share of time idle with work that memory kept out")
    return lines
