"""A request survives the loss of a worker.

Before its first token, a request whose prefill, decode or encode worker is
lost (gone, or shutting down) is simply run again on siblings. After it, a lost
decode worker is replaced: the prompt plus every token produced so far is
prefilled again and generation continues on another decode worker, in the same
client stream. Greedy output is exactly what an undisturbed run gives; sampled
output goes on with an advanced seed (`PreparedRequest.continued`).

The new decode worker's detokenizer only sees the new tokens, so after a
resume the router itself turns tokens into text, carrying on from everything
already produced and sent: characters split across the seam and stop strings
spanning it come out as in an undisturbed run."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from .. import metrics
from ..engine.detokenizer import IncrementalDetokenizer
from ..messages import GeneratedChunk
from ..models import ModelAdapter
from .errors import APIError
from .pipeline import StageFailure, StagePipeline
from .prepare import PreparedRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """A piece of the answer as the client sees it."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str = ""


class ContinuedText:
    """Text of a resumed stream, from all of its tokens."""

    def __init__(self, adapter: ModelAdapter, request: PreparedRequest, produced: list[int], sent: int) -> None:
        self.eos = set(adapter.eos_token_ids)
        self.ignore_eos = request.sampling.ignore_eos
        self.detokenizer = IncrementalDetokenizer(adapter.token_decoder, request.sampling.stop, list(produced), sent)

    def next(self, tokens: list[int], finish: str) -> tuple[str, str]:
        """The text these tokens add, and the finish reason (a stop string may end it sooner)."""
        text = ""
        for index, token in enumerate(tokens):
            if finish and index == len(tokens) - 1 and token in self.eos and not self.ignore_eos:
                return text + self.detokenizer.flush(), "stop"
            text += self.detokenizer.add(token)
            if self.detokenizer.stopped:
                return text, "stop"
        return (text + self.detokenizer.flush(), finish) if finish else (text, "")


class RecoveringStream:
    """Drives attempts of one request until its last token, recovering from lost workers."""

    def __init__(self, pipeline: StagePipeline, adapter: ModelAdapter, max_recoveries: int = 3,
                 worker_wait: float = 15.0) -> None:
        self.pipeline = pipeline
        self.adapter = adapter
        self.max_recoveries = max_recoveries
        self.worker_wait = worker_wait  # how long a recovery waits for a sibling to be live

    async def run(self, request: PreparedRequest) -> AsyncGenerator[Completion, None]:
        produced: list[int] = []
        sent = 0  # characters already given to the client
        continued: ContinuedText | None = None
        attempt = request
        for recovery in range(self.max_recoveries + 1):
            try:
                # closed here, not whenever the collector gets to it: the attempt's cleanup (cancels,
                # the planner's bookkeeping) belongs to this request
                async with aclosing(self._attempt(attempt, recovery)) as chunks:
                    async for chunk in chunks:
                        if not produced:
                            request.cached_tokens = attempt.cached_tokens
                        tokens = list(chunk.token_ids)
                        produced += tokens
                        text, finish = (continued.next(tokens, chunk.finish_reason) if continued
                                        else (chunk.text, chunk.finish_reason))
                        sent += len(text)
                        yield Completion(tuple(tokens), text, finish)
                        if finish:
                            return
            except StageFailure as failure:
                if not failure.retryable or recovery == self.max_recoveries:
                    raise failure.api_error() from failure
                self.pipeline.planner.suspect(failure.address)
                kind = "resume" if produced else "retry"
                log.warning("request %s: %s; %s on another worker", request.request_id, failure, kind)
                metrics.ROUTER_RECOVERIES.labels(kind).inc()
                if produced:
                    continued = continued or ContinuedText(self.adapter, request, produced, sent)
                    attempt = request.continued(produced, recovery + 1, self.adapter.image_token_id)
                else:
                    attempt = request.retried(recovery + 1)

    async def _attempt(self, request: PreparedRequest, recovery: int) -> AsyncGenerator[GeneratedChunk, None]:
        """The pipeline's attempt; a recovery first waits (bounded) for a sibling to be live."""
        deadline = time.monotonic() + (self.worker_wait if recovery else 0)
        while True:
            try:
                stream = self.pipeline.attempt(request)
                first = await stream.__anext__()
                break
            except APIError as exc:
                if exc.code != "stage_unavailable" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.25)  # polling discovery for a live sibling, with a deadline
        try:
            yield first
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()
