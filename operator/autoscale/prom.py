"""Prometheus text read from a pod's /metrics, kept as plain numbers."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Reading:
    """One scrape of one pod: sample name and sorted labels -> value."""

    values: dict[tuple[str, Labels], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Reading:
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
        return cls(values)

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and wanted <= set(ls))

    def buckets(self, name: str, **labels: str) -> dict[float, float]:
        """Cumulative histogram buckets (upper bound -> count) of `name`, summed over other labels."""
        wanted = set(labels.items())
        out: dict[float, float] = {}
        for (n, ls), v in self.values.items():
            if n == f"{name}_bucket" and wanted <= set(ls):
                bound = float(dict(ls)["le"])
                out[bound] = out.get(bound, 0.0) + v
        return out


def scrape(url: str, timeout: float = 2.0) -> Reading | None:
    """A pod's metrics, or None when it cannot be read (starting, gone, or not serving yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return Reading.parse(response.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None
