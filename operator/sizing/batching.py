"""How each kind of instance forms its batches within its limits and its
memory: encode images, prefill prompts (with their images when bundled or
co-located), decode steps with continuous batching and preemption. Mixed into
`Simulation`, whose event loop, routing and bookkeeping they use."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .perfmodel import PerformanceModel
from .serving import Instance, ServingConfig
from .workload import SimRequest

if TYPE_CHECKING:
    from .serving import ImageCost


class StageBatching:
    """Batch formation and completion handlers of the simulator's instances. `Simulation` provides the
    rest they use: `at`, `images_of`, `_busy`, `_blocked`, `_kick`, `_live`, `_to_prefill`,
    `_retire_if_drained`, `_vision_activation` and the completion window."""

    model: PerformanceModel
    config: ServingConfig
    now: float

    if TYPE_CHECKING:  # what Simulation provides
        _window: dict[str, Any]
        _done: int

        def at(self, time: float, action: Callable[..., object], *args: object) -> None: ...
        def images_of(self, request: SimRequest) -> list[ImageCost]: ...
        def _vision_activation(self, costs: list[ImageCost]) -> float: ...
        def _busy(self, instance: Instance, duration: float, items: int, activation: float,
                  done: Callable[..., object], *args: object) -> None: ...
        def _blocked(self, instance: Instance) -> None: ...
        def _kick(self, instance: Instance) -> None: ...
        def _live(self, pool: str) -> list[Instance]: ...
        def _to_prefill(self, request: SimRequest) -> None: ...
        def _retire_if_drained(self, instance: Instance) -> bool: ...

    def _encode_batch(self, instance: Instance) -> None:
        batch: list[tuple[SimRequest, int]] = []  # (request, image index)
        patch, squares = 0, 0
        memory = self.model.memory
        while instance.queue and len(batch) < self.config.encode_batch:
            request, index = instance.queue[0]
            cost = self.images_of(request)[index]
            if batch and memory.encode_activation(patch + cost.patch_tokens,
                                                  squares + cost.tile_token_squares) > instance.memory.activation:
                instance.memory_cut += 1
                break
            batch.append(instance.queue.popleft())
            patch, squares = patch + cost.patch_tokens, squares + cost.tile_token_squares
        if not batch:
            return
        megapixels = sum(self.images_of(r)[i].megapixels for r, i in batch)
        self._busy(instance, self.model.costs.encode_time(patch, megapixels), len(batch),
                   memory.encode_activation(patch, squares), self._encoded, batch)

    def _encoded(self, batch: list[tuple[SimRequest, int]]) -> None:
        for request, _ in batch:
            request.pending_items -= 1
            if request.pending_items == 0:
                request.encoded = self.now
                tokens = sum(c.llm_tokens for c in self.images_of(request))
                self.at(self.now + self.model.embedding_transfer_time(tokens), self._to_prefill, request)

    def _take_prompts(self, instance: Instance, source: deque[SimRequest] | list[SimRequest],
                      with_images: bool) -> tuple[list[SimRequest], float]:
        """Requests for one prefill batch: within the token budget, their KV within the free pool and, when
        the batch encodes its own images, their activations within the reserve."""
        batch: list[SimRequest] = []
        tokens, patch, squares = 0, 0, 0
        memory = self.model.memory
        while source:
            request = source[0]
            if batch and tokens + request.prompt_tokens > self.config.prefill_budget:
                break
            costs = self.images_of(request) if with_images else []
            more_patch = patch + sum(c.patch_tokens for c in costs)
            more_squares = squares + sum(c.tile_token_squares for c in costs)
            if instance.kv_used + tokens + request.prompt_tokens > instance.memory.kv_tokens or (
                    costs and memory.encode_activation(more_patch, more_squares) > instance.memory.activation):
                if batch:
                    instance.memory_cut += 1
                break
            batch.append(source.popleft() if isinstance(source, deque) else source.pop(0))
            tokens, patch, squares = tokens + request.prompt_tokens, more_patch, more_squares
        activation = memory.prefill_activation(min(tokens, self.config.prefill_budget))
        if patch:
            activation = max(activation, memory.encode_activation(patch, squares))
        return batch, activation

    def _start_prefill(self, instance: Instance, batch: list[SimRequest], activation: float,
                       done: Callable[[Instance, list[SimRequest]], None]) -> None:
        duration = self.model.costs.prefill_time([r.prompt_tokens for r in batch])
        if self.config.mode != "epd":
            duration += self._encode_time_of(batch)
        for request in batch:
            request.prefill_start = self.now
            request.kv_holder, request.context = instance, request.prompt_tokens
            instance.kv_used += request.prompt_tokens
        instance.peak_kv = max(instance.peak_kv, instance.kv_used)
        self._busy(instance, duration, len(batch), activation, done, instance, batch)

    def _prefill_batch(self, instance: Instance) -> None:
        if not instance.queue:
            return
        batch, activation = self._take_prompts(instance, instance.queue, self.config.mode == "bundled")
        if not batch:
            self._blocked(instance)
            return
        self._start_prefill(instance, batch, activation, self._prefilled)

    def _encode_time_of(self, batch: list[SimRequest]) -> float:
        costs = [c for r in batch for c in self.images_of(r)]
        if not costs:
            return 0.0
        return self.model.costs.encode_time(sum(c.patch_tokens for c in costs), sum(c.megapixels for c in costs))

    def _prefilled(self, instance: Instance, batch: list[SimRequest]) -> None:
        for request in batch:
            request.first_token, request.generated = self.now, 1
            if request.output_tokens <= 1:
                self._release(request)
                self._complete(request)
            elif instance.pool == "colocated":
                instance.queue.append(request)
            else:
                self.at(self.now + self.model.kv_transfer_time(request.prompt_tokens), self._to_decode, request)

    def _release(self, request: SimRequest) -> None:
        """Free the request's KV where it is held, and let that instance go on."""
        holder = request.kv_holder
        if holder is None:
            return
        holder.kv_used -= request.context
        request.kv_holder, request.context = None, 0
        if not holder.running and not self._retire_if_drained(holder):
            self.at(self.now, self._kick, holder)

    def _to_decode(self, request: SimRequest) -> None:
        pool = self._live("decode")
        target = min(pool, key=lambda i: (i.kv_used + len(i.queue) * request.prompt_tokens, i.busy_until))
        target.queue.append(request)
        self._kick(target)

    def _decode_step(self, instance: Instance) -> None:
        self._make_room(instance)
        recompute = self._admit(instance)
        while not instance.active and self._evict_waiting(instance):  # co-located: prefilled KV blocks the head
            recompute = self._admit(instance)
        if not instance.active:
            if instance.queue:
                self._blocked(instance)
            return
        context = sum(r.context for r in instance.active)
        duration = self.model.costs.decode_time(len(instance.active), context)
        if recompute:  # preempted sequences rebuild their KV before joining the step
            duration += self.model.costs.prefill_time(recompute)
        activation = self.model.memory.decode_activation(len(instance.active))
        self._busy(instance, duration, len(instance.active), activation, self._stepped, instance)

    def _make_room(self, instance: Instance) -> None:
        """Preempt the newest sequences until every running one can grow by a token."""
        while instance.active and instance.kv_used + len(instance.active) > instance.memory.kv_tokens:
            victim = instance.active.pop()
            instance.kv_used -= victim.context
            victim.kv_holder, victim.context = None, 0
            victim.preemptions += 1
            instance.preemptions += 1
            instance.queue.appendleft(victim)

    def _evict_waiting(self, instance: Instance) -> bool:
        """Free the KV of the newest prefilled sequence still waiting to decode (it will recompute)."""
        for request in reversed(instance.queue):
            if request.kv_holder is instance:
                instance.kv_used -= request.context
                request.kv_holder, request.context = None, 0
                request.preemptions += 1
                instance.preemptions += 1
                return True
        return False

    def _admit(self, instance: Instance) -> list[int]:
        """Sequences join the running batch while the pool holds them and their next token; returns the
        context lengths that preempted sequences must recompute."""
        recompute = []
        while instance.queue and len(instance.active) < self.config.decode_batch:
            request = instance.queue[0]
            held = request.kv_holder is instance
            need = 0 if held else request.prompt_tokens + request.generated - 1
            if instance.kv_used + need + len(instance.active) + 1 > instance.memory.kv_tokens:
                instance.memory_cut += 1
                break
            instance.queue.popleft()
            if not held:
                if request.kv_holder is None:
                    recompute.append(need)
                else:
                    self._release(request)  # the prefill instance's copy: decode now holds it
                request.kv_holder, request.context = instance, need
                instance.kv_used += need
            if request.decode_start < 0:
                request.decode_start = self.now
            instance.active.append(request)
        instance.peak_kv = max(instance.peak_kv, instance.kv_used + len(instance.active))
        return recompute

    def _stepped(self, instance: Instance) -> None:
        still = []
        for request in instance.active:
            request.generated += 1
            request.context += 1
            instance.kv_used += 1
            if request.generated >= request.output_tokens:
                self._release(request)
                self._complete(request)
            else:
                still.append(request)
        instance.active = still

    def _colocated_work(self, instance: Instance) -> None:
        resuming = any(r.kv_holder is None for r in instance.queue)  # preempted sequences come first
        if instance.waiting and not resuming:  # prefill (with its encode) first: decode pauses meanwhile
            batch, activation = self._take_prompts(instance, instance.waiting, True)
            if batch:
                self._start_prefill(instance, batch, activation, self._prefilled)
                return
        if instance.queue or instance.active:
            self._decode_step(instance)
        elif instance.waiting:
            self._blocked(instance)

    def _complete(self, request: SimRequest) -> None:
        request.finish = self.now
        self._done += 1
        self._window["completed"].append(request)
