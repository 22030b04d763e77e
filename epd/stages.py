"""The three stages of the request path (DESIGN §2), named once for the workers,
the router, the operator, the planner, the benchmarks and the tests."""

from __future__ import annotations

from typing import Literal

Stage = Literal["encode", "prefill", "decode"]
STAGES: tuple[Stage, ...] = ("encode", "prefill", "decode")
