"""Mutual TLS between the router and the workers and among workers.

One certificate per process serves both roles: a worker's gRPC server requires
a client certificate signed by the deployment's CA, and the same certificate is
presented when that worker (or the router) calls a peer. Clients verify the
server's certificate against the host part of the address they dial (the
advertised address), so certificates carry those names as SANs.

Renewed files are picked up without a restart: the server re-reads them on the
next handshake after they change, and clients open new channels once they
notice the change (`ChannelPool` compares `stamp()`)."""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: this process's certificate chain and key, and the CA that signs its peers."""

    cert: Path
    key: Path
    ca: Path

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            path = Path(getattr(self, name))
            object.__setattr__(self, name, path)
            if not path.is_file() or not os.access(path, os.R_OK):
                raise ValueError(f"--tls-{name} {path}: not a readable file")

    def stamp(self) -> tuple[int, ...] | None:
        """Modification times of the three files (None while they are being swapped)."""
        try:
            return tuple(p.stat().st_mtime_ns for p in (self.cert, self.key, self.ca))
        except OSError:
            return None

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side: a client certificate signed by the CA is required; renewed files reload."""
        def configuration() -> grpc.ServerCertificateConfiguration:
            cert, key, ca = self._read()
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        loaded = {"stamp": self.stamp()}

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            stamp = self.stamp()
            if stamp is None or stamp == loaded["stamp"]:
                return None  # unchanged (or mid-swap): keep the current configuration
            try:
                renewed = configuration()
            except (OSError, ValueError):
                return None
            loaded["stamp"] = stamp
            return renewed

        # grpc keeps the current configuration when the callback returns None; its stubs do not say so
        return grpc.dynamic_ssl_server_credentials(configuration(), fetch,  # type: ignore[arg-type]
                                                   require_client_authentication=True)

    def ssl_context(self, server: bool) -> ssl.SSLContext:
        """The same mutual TLS for a plain socket (the tcp KV path); the files are read at each call, so
        renewed ones serve the next connection."""
        purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
        context = ssl.create_default_context(purpose, cafile=str(self.ca))
        context.load_cert_chain(self.cert, self.key)
        if server:
            context.verify_mode = ssl.CERT_REQUIRED  # a peer without a certificate of our CA is refused
        return context

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client side: trust only the CA, present this process's certificate."""
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mutual TLS (all three, or none)")
    group.add_argument("--tls-cert", default="", metavar="FILE", help="this process's certificate chain (PEM)")
    group.add_argument("--tls-key", default="", metavar="FILE", help="its private key (PEM)")
    group.add_argument("--tls-ca", default="", metavar="FILE", help="CA that signs every peer's certificate (PEM)")


def tls_from_args(args: argparse.Namespace) -> TLSFiles | None:
    """TLS files from `--tls-cert/--tls-key/--tls-ca`; ValueError unless all three or none are given."""
    given = {name: getattr(args, f"tls_{name}") for name in ("cert", "key", "ca")}
    if not any(given.values()):
        return None
    missing = [f"--tls-{name}" for name, value in given.items() if not value]
    if missing:
        raise ValueError(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca; missing {', '.join(missing)}")
    return TLSFiles(**{name: Path(value) for name, value in given.items()})


def bind(server: grpc.aio.Server, address: str, tls: TLSFiles | None) -> int:
    """Listen on `address`: TLS with client certificates required when `tls` is given. Returns the port."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


async def plaintext_health_server(health_servicer, host: str, port: int) -> grpc.aio.Server:
    """A second server carrying only the gRPC health service, without TLS: kubelet's gRPC probes
    cannot present a client certificate, and health says nothing an outsider could use."""
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server
