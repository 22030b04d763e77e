"""The profile `epd profile` writes and `epd plan --profile` reads: timed (and,
since version 2, memory-measured) samples of the real stages, fitted to the
same linear forms as the roofline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .architectures import Architecture
from .hardware import Hardware
from .memory import MemoryCosts, roofline_memory
from .perfmodel import PerformanceModel, StageCosts

PROFILE_VERSION = 2  # 2 added peak memory per sample and the "memory" section
READABLE_VERSIONS = (1, 2)


def profile_document(model: str, hardware: str, encode: list[dict[str, Any]], prefill: list[dict[str, Any]], decode: list[dict[str, Any]],
                     memory: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON `epd profile` writes (and `load_profile` reads). `memory`: weights per part, runtime
    reserve, KV bytes per token and how peaks were measured; samples then carry `peak_bytes`."""
    document = {"version": PROFILE_VERSION, "model": model, "hardware": hardware,
                "encode": encode, "prefill": prefill, "decode": decode}
    if memory is not None:
        document["memory"] = memory
    return document


def load_profile(path: Path, arch: Architecture, hw: Hardware) -> PerformanceModel:
    """Fit the cost forms to the samples of an `epd profile` JSON file. Memory comes from the profile
    when it was measured, else from the architecture's roofline."""
    data = json.loads(Path(path).read_text())
    if data.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: profile version {data.get('version')!r}, expected one of {READABLE_VERSIONS}")
    enc = _fit([[1, s["patch_tokens"], s["megapixels"]] for s in data["encode"]], [s["seconds"] for s in data["encode"]])
    pre = _fit([[1, sum(s["tokens"]), sum(t * t for t in s["tokens"])] for s in data["prefill"]],
               [s["seconds"] for s in data["prefill"]])
    dec = _fit([[1, s["sequences"], s["context_tokens"]] for s in data["decode"]], [s["seconds"] for s in data["decode"]])
    memory, source = roofline_memory(arch), str(path)
    if "memory" in data:
        memory = fit_memory(data)
    else:
        source += " (memory: roofline)"
    return PerformanceModel(arch, hw, StageCosts(*enc, *pre, *dec), source, memory)


def fit_memory(data: dict[str, Any]) -> MemoryCosts:
    """Memory forms from measured peaks. One image size is profiled, so the per-tile attention term cannot
    be told apart from the per-token one: the per-token slope carries both."""
    measured = data["memory"]
    try:
        enc = _fit([[1, s["patch_tokens"]] for s in data["encode"]], [s["peak_bytes"] for s in data["encode"]])
        pre = _fit([[1, sum(s["tokens"])] for s in data["prefill"]], [s["peak_bytes"] for s in data["prefill"]])
        dec = _fit([[1, s["sequences"]] for s in data["decode"]], [s["peak_bytes"] for s in data["decode"]])
        return MemoryCosts(
            vision_weights=float(measured["vision_weight_bytes"]), language_weights=float(measured["language_weight_bytes"]),
            runtime_reserve=float(measured["runtime_reserve_bytes"]), encode_per_patch_token=enc[1],
            encode_per_tile_token_squared=0.0, prefill_fixed=pre[0], prefill_per_token=pre[1], decode_fixed=dec[0],
            decode_per_sequence=dec[1], kv_per_token=float(measured["kv_bytes_per_token"]), encode_fixed=enc[0])
    except KeyError as exc:
        raise ValueError(f"profile memory section or a sample lacks {exc}") from None


def _fit(rows: list[list[float]], values: list[float]) -> list[float]:
    """Non-negative least squares by active set: solve, drop the terms that came out negative, re-solve."""
    import numpy as np

    width = len(rows[0]) if rows else 0
    if len(rows) < width or len(rows) < 3:
        raise ValueError("a profile needs at least 3 samples per stage")
    x, y = np.asarray(rows, dtype=float), np.asarray(values, dtype=float)
    active = list(range(width))
    while True:
        coef = np.zeros(width)
        solution, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        coef[active] = solution
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return [float(c) for c in coef]
        active = [i for i in active if i not in negative]
