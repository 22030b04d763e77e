"""Image dimensions and the one parser of `WIDTHxHEIGHT`, used by every command
line that takes an image size (`epd bench`, `epd plan`, `epd profile`, the
benchmarks) and by the models and the planner."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageSize:
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> ImageSize:
        """`336x336` -> ImageSize(336, 336); ValueError naming the expected form otherwise."""
        width, sep, height = text.strip().lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            raise ValueError(f"an image size looks like WIDTHxHEIGHT with positive numbers, got {text!r}")
        return cls(int(width), int(height))

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def image_size_argument(text: str) -> ImageSize:
    """argparse `type=` for a WIDTHxHEIGHT option: a bad value is a usage error that says why."""
    try:
        return ImageSize.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
