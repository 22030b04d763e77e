"""Route planning: prefill by outstanding tokens less the prompt prefix it
probably holds, decode by KV usage, and the items of one request spread over
the least-loaded encode workers (intra-request parallelism: images, and the
tiles of an anyres image)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..registry import WorkerInfo
from .errors import APIError
from .prefix_affinity import PrefixAffinity


@dataclass(frozen=True)
class RoutePlan:
    prefill: WorkerInfo
    decode: WorkerInfo
    encode: dict[str, list[str]]  # encode worker address -> item keys it encodes for this request


KV_USAGE_STEP = 0.05  # KV usages this close count as equal: sequences in flight decide between them


def decode_rank(worker: WorkerInfo, sent: int = 0) -> tuple[int, int, str]:
    """Least KV usage first, in steps of KV_USAGE_STEP, then fewest sequences (reported in flight plus
    `sent` since): a stale heartbeat's 0.02% of KV must not send a whole burst to one worker."""
    return int(worker.load.kv_usage / KV_USAGE_STEP), worker.load.in_flight + sent, worker.address


@dataclass(frozen=True)
class _Suspicion:
    until: float  # monotonic time after which the worker is tried again
    incarnation: str  # the process that failed ("" when unknown: then any process at the address)

    def covers(self, incarnation: str) -> bool:
        return not self.incarnation or incarnation == self.incarnation


class RoutePlanner:
    """Chooses workers from the live set; keeps a local tally of what it has sent
    since the last load report so concurrent requests do not all pick the same one."""

    def __init__(self, suspect_seconds: float = 10.0, affinity: PrefixAffinity | None = None) -> None:
        self.affinity = affinity or PrefixAffinity()
        self.sent_tokens: Counter[str] = Counter()
        self.sent_items: Counter[str] = Counter()
        self.sent_sequences: Counter[str] = Counter()
        self.suspect_seconds = suspect_seconds
        self.suspects: dict[str, _Suspicion] = {}
        self.incarnations: dict[str, str] = {}  # address -> the incarnation last planned with

    def suspect(self, address: str) -> None:
        """Avoid a worker that just failed a call, until discovery catches up (its heartbeat expires)
        or a new incarnation registers at its address (a restarted process is not the one that failed)."""
        self.suspects[address] = _Suspicion(time.monotonic() + self.suspect_seconds,
                                            self.incarnations.get(address, ""))

    def suspected(self, worker: WorkerInfo) -> bool:
        suspicion = self.suspects.get(worker.address)
        return suspicion is not None and suspicion.covers(worker.incarnation)

    def _healthy(self, workers: dict[str, list[WorkerInfo]]) -> dict[str, list[WorkerInfo]]:
        now = time.monotonic()
        self.suspects = {a: s for a, s in self.suspects.items() if s.until > now}
        healthy = {stage: [w for w in infos if not self.suspected(w)] for stage, infos in workers.items()}
        self.incarnations.update((w.address, w.incarnation) for infos in workers.values() for w in infos)
        return healthy

    def plan(self, workers: dict[str, list[WorkerInfo]], prompt_tokens: int, items_to_encode: list[str],
             prefix_blocks: Sequence[str] = (), block_size: int = 0) -> RoutePlan:
        workers = self._healthy(workers)
        for stage in ("prefill", "decode") + (("encode",) if items_to_encode else ()):
            if not workers.get(stage):
                raise APIError(503, f"no live {stage} worker is registered", "stage_unavailable")
        cached = self.affinity.cached_tokens(prefix_blocks, block_size)  # tokens a worker need not recompute
        prefill = min(workers["prefill"], key=lambda w: (w.load.outstanding_tokens + self.sent_tokens[w.address]
                                                         - cached.get(w.address, 0), w.address))
        self.affinity.record(prefix_blocks, prefill.address)
        decode = min(workers["decode"], key=lambda w: decode_rank(w, self.sent_sequences[w.address]))
        encode: dict[str, list[str]] = {}
        for key in items_to_encode:
            worker = min(workers["encode"], key=lambda w: (w.load.queue + w.load.in_flight
                                                           + self.sent_items[w.address], w.address))
            encode.setdefault(worker.address, []).append(key)
            self.sent_items[worker.address] += 1
        self.sent_tokens[prefill.address] += prompt_tokens
        self.sent_sequences[decode.address] += 1
        return RoutePlan(prefill, decode, encode)

    def release(self, plan: RoutePlan, prompt_tokens: int) -> None:
        """Forget a finished request's contribution to the local tally."""
        self.sent_tokens[plan.prefill.address] -= prompt_tokens
        self.sent_sequences[plan.decode.address] -= 1
        for address, keys in plan.encode.items():
            self.sent_items[address] -= len(keys)
