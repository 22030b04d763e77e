"""The observed window from a Prometheus server: the same quantities the
direct source computes from two readings of every pod (window.py), as PromQL
over the last `seconds`.

Series must carry `namespace`, `epd_deployment` (the EPDDeployment's name) and
`epd_component` (router, encode, prefill, decode): the chart's PodMonitor
relabels pods that way, and a hand-written scrape config must do the same."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from epd import metric_names as names
from epd.stages import STAGES

from ..sizing.scaling import ObservedWindow, StageMetrics
from .window import StageState


class MetricsUnavailable(RuntimeError):
    """Prometheus could not be asked, or refused the query."""


@dataclass(frozen=True)
class Prometheus:
    url: str
    token_file: str = ""  # a bearer token, re-read per query so a rotated Secret is picked up
    timeout: float = 5.0

    def query(self, expr: str, at: float | None = None) -> float:
        """One instant query's single value (a `sum`/`avg`/quantile); 0 when it has no sample."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        request = urllib.request.Request(f"{self.url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode(params)}")
        if self.token_file:
            request.add_header("Authorization", f"Bearer {Path(self.token_file).read_text().strip()}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise MetricsUnavailable(f"Prometheus at {self.url}: {exc}") from exc
        if answer.get("status") != "success":
            raise MetricsUnavailable(f"Prometheus refused {expr!r}: {answer.get('error', answer)}")
        result = answer["data"]["result"]
        if not result:
            return 0.0
        value = float(result[0]["value"][1])
        return 0.0 if math.isnan(value) or math.isinf(value) else value


@dataclass(frozen=True)
class Queries:
    """PromQL for one EPDDeployment over a window of `seconds`."""

    namespace: str
    deployment: str
    seconds: int

    def select(self, component: str, **labels: str) -> str:
        matchers = {"namespace": self.namespace, names.DEPLOYMENT_LABEL: self.deployment,
                    names.COMPONENT_LABEL: component, **labels}
        return "{" + ",".join(f'{k}="{v}"' for k, v in matchers.items()) + "}"

    def increase(self, name: str, component: str, **labels: str) -> str:
        return f"sum(increase({name}{self.select(component, **labels)}[{self.seconds}s]))"

    def quantile(self, q: float, name: str, component: str, **labels: str) -> str:
        return (f"histogram_quantile({q}, sum by (le) "
                f"(rate({name}_bucket{self.select(component, **labels)}[{self.seconds}s])))")

    def busy(self, stage: str) -> str:
        return f"avg(rate(epd_stage_busy_seconds_total{self.select(stage, stage=stage)}[{self.seconds}s]))"

    def gauge(self, how: str, name: str, component: str, **labels: str) -> str:
        return f"{how}({name}{self.select(component, **labels)})"

    def targets_up(self, component: str) -> str:
        return f"sum(up{self.select(component)})"


def prometheus_window(prometheus: Prometheus, queries: Queries, now: float, states: Mapping[str, StageState],
                      decode_batch: int, percentile: float) -> ObservedWindow | None:
    """The window, or None when a role that should report (the router, a stage with ready pods) has no
    target up: no metrics would read as no load."""
    ask = prometheus.query
    for role in ("router", *STAGES):
        if (role == "router" or states[role].ready) and ask(queries.targets_up(role)) < 1:
            return None
    q = percentile / 100
    requests = ask(queries.increase(names.REQUESTS, "router"))
    per_request = max(requests, 1.0)
    stages: dict[str, StageMetrics] = {}
    for stage in STAGES:
        state = states[stage]
        queue = ask(queries.gauge("sum", names.STAGE_QUEUE_DEPTH, stage, stage=stage))
        decode = stage == "decode"
        in_flight = ask(queries.gauge("sum", names.STAGE_IN_FLIGHT, stage, stage=stage)) if decode else 0.0
        stages[stage] = StageMetrics(
            replicas=state.replicas, pending=max(0, state.replicas - state.ready), queue=int(queue),
            busy=min(1.0, ask(queries.busy(stage))),
            latency=ask(queries.quantile(q, names.STAGE_LATENCY, stage, stage=stage)),
            kv_usage=ask(queries.gauge("avg", names.KV_CACHE_USAGE, stage)) if decode else 0.0,
            occupancy=(in_flight + queue) / (max(1, state.replicas) * decode_batch) if decode else 0.0)
    return ObservedWindow(
        time=now, seconds=queries.seconds, arrival_rate=requests / queries.seconds,
        images_per_request=ask(queries.increase(names.REQUEST_IMAGES, "router")) / per_request,
        prompt_tokens=ask(queries.increase(names.PROMPT_TOKENS, "router")) / per_request,
        output_tokens=ask(queries.increase(names.COMPLETION_TOKENS, "router")) / per_request,
        ttft_p90=ask(queries.quantile(q, names.REQUEST_TTFT, "router")),
        tpot_p90=ask(queries.quantile(q, names.REQUEST_TPOT, "router")),
        stages=stages)
