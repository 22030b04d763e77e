"""What each pool did and held during a simulated run (time and memory), what
memory allows for the workload's largest image, and where requests spent
their time."""

from __future__ import annotations

import statistics
from typing import Any

from .limits import memory_limits
from .simulator import Simulation
from .workload import SimRequest


def pool_report(sim: Simulation) -> dict[str, dict[str, Any]]:
    """Per pool: busy share, batches, memory-limited batches, time blocked on memory, preemptions, the
    memory layout of one GPU and the peak in use."""
    end, kv_bytes = sim.now, sim.model.memory.kv_per_token
    out = {}
    for name, layout in sim.memory.items():
        instances = sim.pools[name] + [i for i in sim.retired if i.pool == name]
        lifetime = sum(max(0.0, (i.retired_at if i.retired_at >= 0 else end) - i.ready_at) for i in instances)
        blocked = sum(i.blocked_time + (end - i.blocked_since if i.blocked_since >= 0 else 0.0) for i in instances)
        batches = sum(i.batches for i in instances)
        peak_kv = max((i.peak_kv for i in instances), default=0)
        peak_activation = max((i.peak_activation for i in instances), default=0.0)
        out[name] = {
            "instances": len(sim.pools[name]), "busy": _share(sum(i.busy_total for i in instances), lifetime),
            "batches": batches, "mean_batch": round(sum(i.items for i in instances) / batches, 2) if batches else 0.0,
            "largest_batch": max((i.largest_batch for i in instances), default=0),
            "memory_limited_batches": _share(sum(i.memory_cut for i in instances), batches),
            "blocked_on_memory": _share(blocked, lifetime), "preemptions": sum(i.preemptions for i in instances),
            "peak_kv_tokens": peak_kv, "peak_kv_usage": _share(peak_kv, layout.kv_tokens),
            "peak_activation_gb": round(peak_activation / 1e9, 3),
            "peak_memory_gb": round((layout.weights + layout.reserve + peak_activation + peak_kv * kv_bytes) / 1e9, 3),
            **layout.as_dict()}
    return out


def _share(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole else 0.0


def workload_limits(sim: Simulation, requests: list[SimRequest]) -> dict[str, Any]:
    """Largest encode batch and images per request for the workload's largest image."""
    images = [image for r in requests for image in r.images]
    if not images:
        return {}
    largest_image = max(images, key=lambda i: sim.image(i).patch_tokens)
    limits = memory_limits(sim.model, sim.config, largest_image, max(r.text_tokens for r in requests),
                           max(r.output_tokens for r in requests))
    return {"image": f"{largest_image.width}x{largest_image.height}", **limits.as_dict()}


def phases(requests: list[SimRequest], mode: str) -> dict[str, float]:
    """Mean seconds per phase of the completed requests (queueing included in the waits)."""
    done = [r for r in requests if r.finish >= 0]
    if not done:
        return {}
    parts = {"encode": [r.encoded - r.arrival for r in done if r.encoded >= 0],
             "wait_prefill": [r.prefill_start - max(r.encoded, r.arrival) for r in done],
             "prefill" if mode == "epd" else "encode+prefill": [r.first_token - r.prefill_start for r in done],
             "wait_decode": [r.decode_start - r.first_token for r in done if r.decode_start >= 0],
             "decode": [r.finish - r.decode_start for r in done if r.decode_start >= 0]}
    return {name: round(statistics.fmean(values), 4) for name, values in parts.items() if values}


def rejections(requests: list[SimRequest]) -> dict[str, int]:
    """Why requests were refused, most common first."""
    counts: dict[str, int] = {}
    for r in requests:
        if r.rejected:
            counts[r.rejected] = counts.get(r.rejected, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))
