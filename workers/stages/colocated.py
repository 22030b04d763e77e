"""A colocated worker's scheduler: one loop steps prefill and decode together.

The stage servicers keep their RPCs, queues and streams; only their loops give
way. Each step packs the running sequences' next tokens and the scheduled
prefill chunks into one forward (`engine.mixed`), as a non-disaggregated server
such as vLLM does, instead of alternating a prefill forward and a decode
forward on the worker's single compute thread.

Between steps the loop lets the event loop's other coroutines catch up with the
step, so that nothing waits a whole (prefill-heavy, ~1 s under load) step more:
- a prompt's first token comes from a step; its Prefill call then commits the KV
  to decode and its token stream opens the sequence, each a turn of the event
  loop later, and the sequence decodes in the very next step;
- a prompt that came during a step reserves its decode blocks on the compute
  thread, behind that step; the loop lets the reservation finish and the prompt
  be queued, and the prompt is prefilled in the very next step;
- an image prompt that came during a step waits for its encode batch, which runs
  on the compute thread behind that step; the loop lets the batch finish and its
  embeddings reach the prompt (work the compute thread would do before the next
  step anyway), and the prompt is prefilled in the very next step.
Each lag kept every prompt of a burst a step behind, and a burst's sequences
decoding in lockstep."""

from __future__ import annotations

import asyncio
import logging

from ..engine.mixed import MixedStepper, MixedStepResult
from .context import WorkerContext
from .decode import BatchChanges, DecodeServicer
from .encode import EncodeServicer
from .prefill import PrefillServicer
from .supervision import SupervisedLoop

log = logging.getLogger(__name__)

# Rounds the loop gives, between steps, to handoffs joining decode and arriving prompts being queued; a round
# waits for the compute thread's queue or gives the event loop one turn (each case takes two or three). One
# whose stream is not there yet, whose embeddings are not computed, or that waits for decode blocks to free
# up, is not waited for.
SETTLE_ROUNDS = 16


class ColocatedScheduler:
    def __init__(self, ctx: WorkerContext, encode: EncodeServicer | None, prefill: PrefillServicer,
                 decode: DecodeServicer, step_tokens: int) -> None:
        self.ctx = ctx
        self.encode = encode
        self.prefill = prefill
        self.decode = decode
        self.stepper = MixedStepper(prefill.engine, decode.engine, step_tokens)
        prefill.steps_alone = decode.steps_alone = False
        self.wakeup = decode.wakeup = prefill.wakeup = asyncio.Event()  # work for either engine wakes the loop
        self._loop = SupervisedLoop("colocated scheduler", ctx.health)

    def start(self) -> None:
        self._loop.start(self._run)

    async def stop(self) -> None:
        await self._loop.stop()

    async def _run(self) -> None:
        while True:
            if not self.prefill.engine.has_work and not self.decode.has_work:
                self.wakeup.clear()
                await self.wakeup.wait()
            changes = self.decode.take_changes()
            try:
                result = await self.ctx.compute_shared(self._step, changes)
            except Exception as exc:  # outside the forward (which fails its own batch): fail what decodes
                log.exception("colocated step failed")
                result = MixedStepResult(failed=await self.ctx.compute("decode", self.decode.engine.fail_all),
                                         error=exc)
            else:
                if result.error is not None:
                    log.error("colocated step failed: %r", result.error)
            handed_off = [r.request_id for r in result.prefill
                          if r.handoff is not None and r.request_id in self.prefill.local_handoffs]
            self.prefill.finished(result.prefill)
            error = result.error
            self.decode.finished([(event.request_id, event) for event in result.decode]
                                 + ([(request_id, error) for request_id in result.failed] if error else []))
            await self._settle(handed_off)

    async def _settle(self, handed_off: list[str]) -> None:
        for _ in range(SETTLE_ROUNDS):
            waiting_for = self.prefill.arriving.values()
            if waiting_for and self.ctx.compute_backlog:
                # jobs queued on the compute thread behind the step (arriving prompts' reservations, the encode
                # batch of their images), which run before the next step anyway: a no-op behind them (the
                # thread runs its jobs in order) waits for them
                await self.ctx.compute("prefill", lambda: None)
            elif any(self._computed(keys) for keys in waiting_for) or any(
                    r in self.prefill.local_handoffs or self.decode.opening(r) for r in handed_off):
                await asyncio.sleep(0)  # one event-loop turn: the Encode, Prefill calls and token streams run
            else:
                return

    def _computed(self, keys: tuple[str, ...]) -> bool:
        """The embeddings a prompt waits for are all computed in this process (on their way to it)."""
        return all(key in self.prefill.embeddings.buffer or (self.encode is not None and key in self.encode.lru)
                   for key in keys)

    def _step(self, changes: BatchChanges) -> tuple[MixedStepResult, dict[str, float]]:
        self.decode.apply(changes)
        result = self.stepper.step()
        return result, {"prefill": result.prefill_tokens, "decode": result.decode_tokens}
