"""The `Cancel` RPC of a stage: the router calls it when the client has left, so
the stage stops spending work on a request nobody will read.

A servicer mixes this in and brackets each request handler with
`track(request_id)` / `untrack(request_id)`; `Cancel` then cancels the
handler tasks serving that request (a request may have several at one stage,
e.g. encode calls from the router and from a prefill recompute). Cancelling a
task cancels whatever it awaits: a queued batch slot, a wait for embeddings,
an outgoing transfer."""

from __future__ import annotations

import asyncio

import grpc

from epd.v1 import stages_pb2 as pb


class CancellableRequests:
    """Mixin for stage servicers. The generated servicer base (listed first) has a `Cancel` stub
    that would win, so the servicer names this one: `Cancel = CancellableRequests.Cancel`."""

    @property
    def _handlers(self) -> dict[str, set[asyncio.Task]]:
        handlers = self.__dict__.get("_request_handlers")
        if handlers is None:
            handlers = self.__dict__["_request_handlers"] = {}
        return handlers

    def track(self, request_id: str) -> None:
        task = asyncio.current_task()
        if request_id and task is not None:
            self._handlers.setdefault(request_id, set()).add(task)

    def untrack(self, request_id: str) -> None:
        tasks = self._handlers.get(request_id)
        if tasks is not None:
            tasks.discard(asyncio.current_task())
            if not tasks:
                del self._handlers[request_id]

    def cancel_request(self, request_id: str) -> bool:
        """Cancel every handler serving `request_id`; whether there was one."""
        tasks = self._handlers.pop(request_id, set())
        for task in tasks:
            task.cancel()
        return bool(tasks)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        return pb.CancelResponse(cancelled=self.cancel_request(request.request_id))
