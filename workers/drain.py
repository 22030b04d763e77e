"""Graceful shutdown. `until_signalled` waits for SIGTERM/SIGINT (router and
workers). Then a worker drains: it leaves discovery first (peers stop
choosing it), finishes the calls it holds, then exits; calls still running
when the drain timeout ends are cut, and the router moves them to a sibling.

"Holds" is counted at the gRPC layer, by an interceptor around every stage
RPC, so it covers whatever a stage does: an encode batch, a prefill waiting
for embeddings, a decode stream, a KV transfer coming in."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time

import grpc

from . import timeouts

log = logging.getLogger(__name__)

# Probes and tooling, not work: a health Watch stream would otherwise hold the drain open. The token
# feed lives as long as its router; the requests it follows are counted one by one (`started`).
NOT_WORK = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/epd.v1.DecodeService/Feed")


class ActiveCalls(grpc.aio.ServerInterceptor):
    """Counts the stage RPCs in progress; `idle` is set while there are none."""

    def __init__(self) -> None:
        self._active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def active(self) -> int:
        return self._active

    @active.setter
    def active(self, count: int) -> None:
        self._active = count
        if count:
            self.idle.clear()
        else:
            self.idle.set()

    def started(self) -> None:
        """Work that is not a call of its own began (a request the token feed follows)."""
        self.active += 1

    def ended(self) -> None:
        self.active -= 1

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(NOT_WORK):
            return handler
        kind = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        for name in kind:
            behavior = getattr(handler, name)
            if behavior is not None:
                make = getattr(grpc, f"{name}_rpc_method_handler")
                return make(self._counted(behavior), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler

    def _counted(self, behavior):
        if inspect.isasyncgenfunction(behavior):
            async def streamed(request, context):
                self.started()
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self.ended()
            return streamed

        async def answered(request, context):
            self.started()
            try:
                return await behavior(request, context)
            finally:
                self.ended()
        return answered


async def drain(calls: ActiveCalls, within: float, settle: float = 1.0) -> bool:
    """After the worker has left discovery: give peers `settle` seconds to notice (calls they
    had already routed here still arrive), then wait until `within` seconds from the start for the
    calls in progress. Returns whether everything finished."""
    start = time.monotonic()
    await asyncio.sleep(settle)  # the routers refresh their view of the workers twice a second
    log.info("draining: %d call(s) in progress", calls.active)
    try:
        await timeouts.within(calls.idle.wait(), max(0.0, within - (time.monotonic() - start)))
    except TimeoutError:
        log.warning("drain timed out after %.0fs with %d call(s) in progress", within, calls.active)
        return False
    log.info("drained in %.1fs", time.monotonic() - start)
    return True


async def until_signalled() -> None:
    """Return once the process gets SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
