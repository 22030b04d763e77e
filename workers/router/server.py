"""Running the router's two HTTP servers until SIGTERM/SIGINT.

The public one drops connections that do not deliver a complete request head
within `header_timeout` seconds of opening or of their previous response
(slow header trickling, idle keep-alive), and cancels a request's handler when
its client disconnects, which cancels the request at the stages."""

from __future__ import annotations

from aiohttp import web

from ..drain import until_signalled
from .request_body import RequestLimits


async def serve(app: web.Application, metrics_app: web.Application, host: str, port: int, metrics_port: int,
                limits: RequestLimits, shutdown_grace: float = 30.0) -> None:
    """Serve until a signal; in-flight requests get `shutdown_grace` seconds to finish."""
    public = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=limits.header_timeout,
                           shutdown_timeout=shutdown_grace, access_log=None)
    private = web.AppRunner(metrics_app, access_log=None)
    await public.setup()
    await private.setup()
    try:
        await web.TCPSite(public, host, port).start()
        await web.TCPSite(private, host, metrics_port).start()
        bound, metrics_bound = public.addresses[0][1], private.addresses[0][1]
        print(f"EPD_ROUTER_READY http://{host}:{bound} metrics=http://{host}:{metrics_bound}/metrics", flush=True)
        await until_signalled()
    finally:
        await public.cleanup()
        await private.cleanup()

