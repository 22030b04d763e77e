"""The workloads the planning tests and the paper write-up share."""

from __future__ import annotations

from epd.image_size import ImageSize
from epd.operator.sizing.architectures import get_architecture
from epd.operator.sizing.hardware import get_hardware
from epd.operator.sizing.perfmodel import roofline
from epd.operator.sizing.workload import SimRequest, WorkloadMix, bursty
from epd.slo import SLO

LLAVA_A100 = roofline(get_architecture("llava-1.5-7b"), get_hardware("a100-80gb"))
MINICPM_A100 = roofline(get_architecture("minicpm-v-2.6"), get_hardware("a100-80gb"))

BURSTY_MIX = WorkloadMix(images_per_request=6, image_size=ImageSize(2048, 1536), text_tokens=64, output_tokens=128)
BURSTY_SLO = SLO(2.0, 0.05)


def bursty_trace():
    """An hour of image-heavy traffic: 1 req/s with a 4 req/s burst in the last quarter of every 20 minutes."""
    return bursty(1.0, 4.0, 1200, 0.25, 3600, BURSTY_MIX, seed=3)


def role_switch_trace() -> list[SimRequest]:
    """The paper's role-switching run: 100 requests of one 4K image at 3 req/s; the first 10 want 50
    output tokens, the other 90 want 500."""
    return [SimRequest(i, i / 3.0, [ImageSize(3840, 2160)], 22, 50 if i < 10 else 500) for i in range(100)]
