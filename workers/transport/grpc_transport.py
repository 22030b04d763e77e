"""gRPC channels to peers (mutual TLS when configured)."""

from __future__ import annotations

import time

import grpc

from ..security.tls import TLSFiles

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   # KV frames are megabytes: read the socket in large chunks
                   ("grpc.experimental.tcp_min_read_chunk_size", 4 << 20),
                   ("grpc.experimental.tcp_max_read_chunk_size", 64 << 20),
                   ("grpc.experimental.tcp_read_chunk_size", 16 << 20)]


class ChannelPool:
    """One channel per peer address, reused across calls: mutual TLS with `tls`, else plain
    (loopback only). Renewed certificate files are noticed within `recheck` seconds; calls
    after that use new channels, and calls already running finish on the old ones."""

    def __init__(self, tls: TLSFiles | None = None, recheck: float = 30.0) -> None:
        self.tls = tls
        self.recheck = recheck
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []
        self._credentials = tls.channel_credentials() if tls else None
        self._stamp = tls.stamp() if tls else None
        self._checked = time.monotonic()

    def get(self, address: str) -> grpc.aio.Channel:
        if self.tls is not None and time.monotonic() - self._checked > self.recheck:
            self._reload_if_renewed()
        channel = self._channels.get(address)
        if channel is None:
            channel = (grpc.aio.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS)
                       if self._credentials else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
            self._channels[address] = channel
        return channel

    def _reload_if_renewed(self) -> None:
        self._checked = time.monotonic()
        tls = self.tls
        stamp = tls.stamp() if tls is not None else None
        if tls is None or stamp is None or stamp == self._stamp:
            return
        self._credentials, self._stamp = tls.channel_credentials(), stamp
        self._retired.extend(self._channels.values())
        self._channels = {}

    async def close(self) -> None:
        for channel in [*self._channels.values(), *self._retired]:
            await channel.close()
        self._channels.clear()
        self._retired.clear()
