"""Discrete-event simulator of three ways to serve the same workload:

* `epd`: separate encode, prefill and decode pools (images of a request spread
  over encode instances with intra-request parallelism, or kept on one);
* `bundled`: encode+prefill instances (vision runs inside the prefill batch) and
  a decode pool;
* `colocated`: every instance runs everything, prefill batches pausing decode.

Batching mirrors the workers: encode takes up to `encode_batch` images, prefill
up to `prefill_budget` tokens, decode continuous batching up to `decode_batch`
sequences within the instance's KV capacity. Pools can be resized while running
(the autoscaler's closed loop) with a start-up delay for new instances."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .perfmodel import PerformanceModel
from .workload import SimRequest, prompt_tokens

MODES = ("epd", "bundled", "colocated")


@dataclass(frozen=True)
class ServingConfig:
    mode: str
    encode: int = 0  # instances (GPUs) per pool; `encode` counts E+P instances in bundled mode
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    intra_request_parallel: bool = True
    encode_batch: int = 16
    prefill_budget: int = 16384
    decode_batch: int = 128

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if min(self.encode_batch, self.prefill_budget, self.decode_batch) <= 0:
            raise ValueError("batch limits must be positive")

    @property
    def gpus(self) -> int:
        return {"epd": self.encode + self.prefill + self.decode, "bundled": self.encode + self.decode,
                "colocated": self.colocated}[self.mode]

    def label(self) -> str:
        if self.mode == "epd":
            return f"{self.encode}E{self.prefill}P{self.decode}D" + ("" if self.intra_request_parallel else "-noIRP")
        if self.mode == "bundled":
            return f"{self.encode}EP{self.decode}D"
        return f"{self.colocated}x(EPD)"


@dataclass
class Instance:
    pool: str
    ready_at: float = 0.0
    busy_until: float = 0.0
    busy_time: float = 0.0
    draining: bool = False
    queue: deque = field(default_factory=deque)  # encode: (request, image index); prefill: requests
    active: list = field(default_factory=list)  # decode: [request, generated, context]
    waiting: list = field(default_factory=list)  # colocated: requests to prefill
    running: bool = False

    def load(self) -> float:
        return len(self.queue) + len(self.active) + len(self.waiting) + (1 if self.running else 0)


@dataclass
class Observation:
    """What the autoscaler sees at a control tick (the window since the last one)."""

    time: float
    window: float
    arrivals: int
    images: int
    completed: list[SimRequest]
    queue: dict[str, int]
    busy: dict[str, float]
    replicas: dict[str, int]
    pending: dict[str, int]
    kv_usage: float
    occupancy: float  # decode sequences active or waiting / (decode instances x batch limit); > 1 = queued


class Simulation:
    def __init__(self, model: PerformanceModel, config: ServingConfig, startup_delay: float = 60.0) -> None:
        self.model = model
        self.config = config
        self.startup_delay = startup_delay
        self.events: list = []
        self.counter = itertools.count()
        self.now = 0.0
        pools = {"epd": {"encode": config.encode, "prefill": config.prefill, "decode": config.decode},
                 "bundled": {"prefill": config.encode, "decode": config.decode},
                 "colocated": {"colocated": config.colocated}}[config.mode]
        self.pools: dict[str, list[Instance]] = {name: [Instance(name) for _ in range(n)] for name, n in pools.items()}
        self.kv_capacity = model.kv_capacity_tokens()
        self.gpu_seconds = 0.0
        self._last_accounting = 0.0
        self._window: dict = {"arrivals": 0, "images": 0, "completed": []}

    # ---- event loop ------------------------------------------------------------------
    def at(self, time: float, action: Callable, *args) -> None:
        heapq.heappush(self.events, (time, next(self.counter), action, args))

    def run(self, requests: list[SimRequest], controller: Callable[[Observation], dict[str, int]] | None = None,
            interval: float = 10.0) -> list[SimRequest]:
        for request in requests:
            request.prompt_tokens = prompt_tokens(request, self.model.architecture)
            self.at(request.arrival, self._arrive, request)
        if controller is not None:
            self.at(interval, self._control, controller, interval, len(requests))
        self._done = 0
        while self.events:
            time, _, action, args = heapq.heappop(self.events)
            self._account(time)
            self.now = time
            action(*args)
        return requests

    def _account(self, time: float) -> None:
        instances = sum(len(pool) for pool in self.pools.values())
        self.gpu_seconds += instances * (time - self._last_accounting)
        self._last_accounting = time

    # ---- arrival and routing -----------------------------------------------------------
    def _arrive(self, request: SimRequest) -> None:
        self._window["arrivals"] += 1
        self._window["images"] += len(request.images)
        mode = self.config.mode
        if mode == "epd" and request.images:
            pool = self._live("encode")
            request.pending_items = len(request.images)
            if self.config.intra_request_parallel:
                for index in range(len(request.images)):
                    self._least_loaded(pool).queue.append((request, index))
            else:
                target = self._least_loaded(pool)
                target.queue.extend((request, index) for index in range(len(request.images)))
            for instance in pool:
                self._kick(instance)
        elif mode == "colocated":
            target = self._least_loaded(self._live("colocated"))
            target.waiting.append(request)
            self._kick(target)
        else:
            self._to_prefill(request)

    def _live(self, pool: str) -> list[Instance]:
        live = [i for i in self.pools[pool] if not i.draining and i.ready_at <= self.now]
        return live or [i for i in self.pools[pool] if not i.draining] or self.pools[pool]

    @staticmethod
    def _least_loaded(pool: list[Instance]) -> Instance:
        return min(pool, key=lambda i: (i.load(), i.busy_until))

    def _to_prefill(self, request: SimRequest) -> None:
        target = self._least_loaded(self._live("prefill"))
        target.queue.append(request)
        self._kick(target)

    # ---- work on an instance -----------------------------------------------------------
    def _kick(self, instance: Instance) -> None:
        if instance.running:
            return
        start = max(self.now, instance.ready_at)
        if start > self.now:
            self.at(start, self._kick, instance)
            return
        handler = {"encode": self._encode_batch, "prefill": self._prefill_batch, "decode": self._decode_step,
                   "colocated": self._colocated_work}[instance.pool]
        handler(instance)

    def _busy(self, instance: Instance, duration: float, done: Callable, *args) -> None:
        instance.running = True
        instance.busy_time += duration
        instance.busy_until = self.now + duration
        self.at(self.now + duration, self._finish_work, instance, done, args)

    def _finish_work(self, instance: Instance, done: Callable, args) -> None:
        instance.running = False
        done(*args)
        if instance.draining and instance.load() == 0:
            self.pools[instance.pool].remove(instance)  # drained: the GPU is released
            return
        self._kick(instance)

    def _encode_batch(self, instance: Instance) -> None:
        if not instance.queue:
            return
        batch = [instance.queue.popleft() for _ in range(min(self.config.encode_batch, len(instance.queue)))]
        arch = self.model.architecture
        patch = sum(arch.vision_patch_tokens(r.images[i].width, r.images[i].height) for r, i in batch)
        megapixels = sum(r.images[i].width * r.images[i].height for r, i in batch) / 1e6
        self._busy(instance, self.model.costs.encode_time(patch, megapixels), self._encoded, batch)

    def _encoded(self, batch: list) -> None:
        arch = self.model.architecture
        for request, _ in batch:
            request.pending_items -= 1
            if request.pending_items == 0:
                tokens = sum(arch.image_tokens(i.width, i.height) for i in request.images)
                self.at(self.now + self.model.embedding_transfer_time(tokens), self._to_prefill, request)

    def _prefill_batch(self, instance: Instance) -> None:
        if not instance.queue:
            return
        batch, used = [], 0
        while instance.queue and (not batch or used + instance.queue[0].prompt_tokens <= self.config.prefill_budget):
            request = instance.queue.popleft()
            batch.append(request)
            used += request.prompt_tokens
        duration = self.model.costs.prefill_time([r.prompt_tokens for r in batch])
        if self.config.mode == "bundled":
            duration += self._encode_time_of(batch)
        self._busy(instance, duration, self._prefilled, batch)

    def _encode_time_of(self, batch: list[SimRequest]) -> float:
        arch = self.model.architecture
        images = [image for r in batch for image in r.images]
        if not images:
            return 0.0
        return self.model.costs.encode_time(sum(arch.vision_patch_tokens(i.width, i.height) for i in images),
                                            sum(i.width * i.height for i in images) / 1e6)

    def _prefilled(self, batch: list[SimRequest]) -> None:
        for request in batch:
            request.first_token = self.now
            if request.output_tokens <= 1:
                self._complete(request)
                continue
            self.at(self.now + self.model.kv_transfer_time(request.prompt_tokens), self._to_decode, request)

    def _to_decode(self, request: SimRequest) -> None:
        pool = self._live("decode")
        target = min(pool, key=lambda i: (sum(a[2] for a in i.active) + len(i.queue) * request.prompt_tokens,
                                          i.busy_until))
        target.queue.append(request)
        self._kick(target)

    def _decode_step(self, instance: Instance) -> None:
        used = sum(a[2] for a in instance.active)
        while instance.queue and len(instance.active) < self.config.decode_batch and \
                used + instance.queue[0].prompt_tokens + instance.queue[0].output_tokens <= max(self.kv_capacity, 1):
            request = instance.queue.popleft()
            instance.active.append([request, 1, request.prompt_tokens + 1])
            used += request.prompt_tokens + 1
        if not instance.active:
            return
        duration = self.model.costs.decode_time(len(instance.active), used)
        self._busy(instance, duration, self._stepped, instance)

    def _stepped(self, instance: Instance) -> None:
        still = []
        for entry in instance.active:
            entry[1] += 1
            entry[2] += 1
            if entry[1] >= entry[0].output_tokens:
                self._complete(entry[0])
            else:
                still.append(entry)
        instance.active = still

    def _colocated_work(self, instance: Instance) -> None:
        if instance.waiting:  # prefill (with its encode) first: decode pauses meanwhile
            batch, used = [], 0
            while instance.waiting and (not batch or used + instance.waiting[0].prompt_tokens <= self.config.prefill_budget):
                request = instance.waiting.pop(0)
                batch.append(request)
                used += request.prompt_tokens
            duration = self.model.costs.prefill_time([r.prompt_tokens for r in batch]) + self._encode_time_of(batch)
            self._busy(instance, duration, self._colocated_prefilled, instance, batch)
        elif instance.queue or instance.active:
            self._decode_step(instance)

    def _colocated_prefilled(self, instance: Instance, batch: list[SimRequest]) -> None:
        for request in batch:
            request.first_token = self.now
            if request.output_tokens <= 1:
                self._complete(request)
            else:
                instance.queue.append(request)

    def _complete(self, request: SimRequest) -> None:
        request.finish = self.now
        self._done += 1
        self._window["completed"].append(request)

    # ---- closed loop -------------------------------------------------------------------------
    def _control(self, controller: Callable[[Observation], dict[str, int]], interval: float, total: int) -> None:
        observation = self._observe(interval)
        for pool, desired in controller(observation).items():
            self.resize(pool, desired)
        if self._done < total:
            self.at(self.now + interval, self._control, controller, interval, total)

    def _observe(self, window: float) -> Observation:
        busy, queue, replicas, pending = {}, {}, {}, {}
        for name, pool in self.pools.items():
            live = [i for i in pool if i.ready_at <= self.now]
            busy[name] = sum(min(i.busy_time, window) for i in live) / (window * max(len(live), 1))
            for i in live:
                i.busy_time = 0.0
            queue[name] = sum(len(i.queue) + len(i.waiting) for i in pool)
            replicas[name] = len([i for i in pool if not i.draining])
            pending[name] = len([i for i in pool if i.ready_at > self.now])
        decode = self.pools.get("decode") or self.pools.get("colocated") or []
        kv = sum(sum(a[2] for a in i.active) for i in decode) / max(1, self.kv_capacity * len(decode))
        occupancy = sum(len(i.active) + len(i.queue) for i in decode) / max(1, self.config.decode_batch * len(decode))
        observation = Observation(self.now, window, self._window["arrivals"], self._window["images"],
                                  self._window["completed"], queue, busy, replicas, pending, kv, occupancy)
        self._window = {"arrivals": 0, "images": 0, "completed": []}
        return observation

    def resize(self, pool_name: str, desired: int) -> None:
        pool = self.pools[pool_name]
        serving = [i for i in pool if not i.draining]
        for _ in range(desired - len(serving)):
            pool.append(Instance(pool_name, ready_at=self.now + self.startup_delay))
        if desired < len(serving):
            # drain the least loaded; a draining instance finishes its work, takes no new work
            for instance in sorted(serving, key=lambda i: i.load())[:len(serving) - desired]:
                instance.draining = True
                self._requeue(instance)
        self.pools[pool_name] = [i for i in pool if not (i.draining and not i.running and i.load() == 0)]

    def _requeue(self, instance: Instance) -> None:
        """Work not started on a draining instance moves to the others."""
        waiting, instance.waiting = instance.waiting, []
        queued = []
        if instance.pool in ("encode", "prefill"):  # decode work holds its KV cache here: it stays
            queued, instance.queue = list(instance.queue), deque()
        for item in queued:
            if instance.pool == "encode":
                self._least_loaded(self._live("encode")).queue.append(item)
            else:
                self._to_prefill(item)
        for request in waiting:
            self._least_loaded(self._live(instance.pool)).waiting.append(request)
        for other in self._live(instance.pool):
            self._kick(other)
