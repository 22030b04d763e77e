"""Discrete-event simulator of three ways to serve the same workload:

* `epd`: separate encode, prefill and decode pools (images of a request spread
  over encode instances with intra-request parallelism, or kept on one);
* `bundled`: encode+prefill instances (vision runs inside the prefill batch, over
  all the batch's images at once) and a decode pool;
* `colocated`: every instance runs everything, prefill batches pausing decode.

Batching mirrors the workers, and every batch must fit its GPU's memory
(`memory.plan_instance`): encode takes up to `encode_batch` images whose
activations fit next to the vision weights; prefill up to `prefill_budget`
tokens whose KV fits the free part of the instance's pool (held until decode
takes the request over) and, bundled, whose images' activations fit the
reserve; decode batches continuously up to `decode_batch` sequences, and when
the pool cannot grow every sequence by a token it preempts the newest ones,
which later recompute their context, as the engines do. A request that can
never fit (an image larger than an encode GPU's room, a prompt larger than a
KV pool, more tokens than the context) is rejected at arrival. Pools can be
resized while running (the autoscaler's closed loop) with a start-up delay."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from epd.image_size import ImageSize

from .batching import StageBatching
from .memory import gb
from .perfmodel import PerformanceModel
from .serving import MODES, ROLES, ImageCost, Instance, Observation, ServingConfig, instance_memory
from .workload import SimRequest, prompt_tokens

__all__ = ["MODES", "ROLES", "Observation", "ServingConfig", "Simulation", "instance_memory"]


class Simulation(StageBatching):
    """Runs one configuration over a workload; `run` returns the requests with their timings."""

    def __init__(self, model: PerformanceModel, config: ServingConfig, startup_delay: float = 60.0) -> None:
        self.model = model
        self.config = config
        self.startup_delay = startup_delay
        self.events: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self.counter = itertools.count()
        self.now = 0.0
        self.memory = instance_memory(model, config)
        self.pools: dict[str, list[Instance]] = {name: [Instance(name, self.memory[name]) for _ in range(n)]
                                                 for name, n in config.pool_sizes().items()}
        self.retired: list[Instance] = []
        self._handlers: dict[str, Callable[[Instance], None]] = {
            "encode": self._encode_batch, "prefill": self._prefill_batch, "decode": self._decode_step,
            "colocated": self._colocated_work}
        self.gpu_seconds = 0.0
        self._last_accounting = 0.0
        self._images: dict[tuple[int, int], ImageCost] = {}
        self._request_images: dict[int, list[ImageCost]] = {}
        self._window: dict[str, Any] = {"arrivals": 0, "images": 0, "completed": []}

    # ---- event loop ------------------------------------------------------------------
    def at(self, time: float, action: Callable[..., object], *args: Any) -> None:
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
            self.now = time
            action(*args)
        self._account()
        return requests

    def _account(self) -> None:
        """GPU-seconds so far; called whenever the number of instances is about to change."""
        instances = sum(len(pool) for pool in self.pools.values())
        self.gpu_seconds += instances * (self.now - self._last_accounting)
        self._last_accounting = self.now

    def image(self, shape: ImageSize) -> ImageCost:
        key = (shape.width, shape.height)
        cost = self._images.get(key)
        if cost is None:
            arch = self.model.architecture
            cost = ImageCost(arch.vision_patch_tokens(shape.width, shape.height),
                             arch.tile_token_squares(shape.width, shape.height), shape.width * shape.height / 1e6,
                             arch.image_tokens(shape.width, shape.height))
            self._images[key] = cost
        return cost

    def images_of(self, request: SimRequest) -> list[ImageCost]:
        costs = self._request_images.get(id(request))
        if costs is None:
            costs = self._request_images[id(request)] = [self.image(i) for i in request.images]
        return costs

    def _vision_activation(self, costs: list[ImageCost]) -> float:
        return self.model.memory.encode_activation(sum(c.patch_tokens for c in costs),
                                                   sum(c.tile_token_squares for c in costs))

    # ---- arrival and routing -----------------------------------------------------------
    def _arrive(self, request: SimRequest) -> None:
        self._window["arrivals"] += 1
        self._window["images"] += len(request.images)
        request.rejected = self._rejection(request)
        if request.rejected:
            self._done += 1
            return
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

    def _rejection(self, request: SimRequest) -> str:
        """Why `request` can never be served by this configuration ('' when it can)."""
        arch, memory = self.model.architecture, self.memory
        total = request.prompt_tokens + request.output_tokens
        if total > arch.max_context:
            return f"{total} tokens exceed the {arch.max_context}-token context"
        last = memory["colocated" if self.config.mode == "colocated" else "decode"]
        if total > last.kv_tokens:
            return f"its {total} tokens exceed the {last.kv_tokens}-token KV pool of {_gpu(last.role)}"
        first = memory["colocated" if self.config.mode == "colocated" else "prefill"]
        if request.prompt_tokens > first.kv_tokens:
            return f"its {request.prompt_tokens}-token prompt exceeds the {first.kv_tokens}-token KV pool of {_gpu(first.role)}"
        if self.config.mode == "epd":
            need = max((self._vision_activation([c]) for c in self.images_of(request)), default=0.0)
            if need > memory["encode"].activation:
                return f"one image needs {gb(need)} of vision activations; an encode GPU has {gb(memory['encode'].activation)}"
        else:
            need = self._vision_activation(self.images_of(request))
            if need > first.activation:
                return (f"its {len(request.images)} images need {gb(need)} of vision activations in one forward; "
                        f"{_gpu(first.role)} reserves {gb(first.activation)}")
        return ""

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
        if instance.running or instance.retired_at >= 0:
            return
        start = max(self.now, instance.ready_at)
        if start > self.now:
            self.at(start, self._kick, instance)
            return
        self._handlers[instance.pool](instance)

    def _busy(self, instance: Instance, duration: float, items: int, activation: float, done: Callable[..., object],
              *args: Any) -> None:
        if instance.blocked_since >= 0:
            instance.blocked_time += self.now - instance.blocked_since
            instance.blocked_since = -1.0
        instance.running = True
        instance.busy_time += duration
        instance.busy_total += duration
        instance.batches += 1
        instance.items += items
        instance.largest_batch = max(instance.largest_batch, items)
        instance.peak_activation = max(instance.peak_activation, activation)
        instance.busy_until = self.now + duration
        self.at(self.now + duration, self._finish_work, instance, done, args)

    def _blocked(self, instance: Instance) -> None:
        """Work is queued but memory keeps it out until something frees KV."""
        if instance.blocked_since < 0:
            instance.blocked_since = self.now

    def _finish_work(self, instance: Instance, done: Callable[..., object], args: tuple[Any, ...]) -> None:
        instance.running = False
        done(*args)
        if not self._retire_if_drained(instance):
            self._kick(instance)

    def _retire_if_drained(self, instance: Instance) -> bool:
        if not instance.draining or instance.running or instance.load() or instance.kv_used:
            return False
        self._account()
        self.pools[instance.pool].remove(instance)  # drained: the GPU is released
        instance.retired_at = self.now
        self.retired.append(instance)
        return True

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
        kv = sum(i.kv_used for i in decode) / max(1, sum(i.memory.kv_tokens for i in decode))
        occupancy = sum(len(i.active) + len(i.queue) for i in decode) / max(1, self.config.decode_batch * len(decode))
        observation = Observation(self.now, window, self._window["arrivals"], self._window["images"],
                                  self._window["completed"], queue, busy, replicas, pending, kv, occupancy)
        self._window = {"arrivals": 0, "images": 0, "completed": []}
        return observation

    def resize(self, pool_name: str, desired: int) -> None:
        self._account()
        pool = self.pools[pool_name]
        serving = [i for i in pool if not i.draining]
        for _ in range(desired - len(serving)):
            pool.append(Instance(pool_name, self.memory[pool_name], ready_at=self.now + self.startup_delay))
        if desired < len(serving):
            # drain the least loaded; a draining instance finishes its work, takes no new work
            for instance in sorted(serving, key=lambda i: i.load())[:len(serving) - desired]:
                instance.draining = True
                self._requeue(instance)
        for instance in [i for i in pool if i.draining]:
            self._retire_if_drained(instance)

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


def _gpu(role: str) -> str:
    return f"{'an' if role[0] in 'aeiou' else 'a'} {role} GPU"
