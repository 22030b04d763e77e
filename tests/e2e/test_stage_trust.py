"""Mutual TLS between the stages, against a real worker process: a gRPC call without a
valid client certificate is refused, one with it gets through; reflection is off
unless asked for; probes have a plaintext health port; and `epd serve --tls` serves
requests end to end over mTLS."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from epd.v1 import stages_pb2 as pb
from epd.v1 import stages_pb2_grpc as pb_grpc
from epd.workers.launcher.processes import ProcessGroup, epd_command, free_port
from epd.workers.security.certs import CertificateAuthority

from .harness import start_serve


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(directory / "ca")
    stranger = CertificateAuthority.create(directory / "other-ca", name="someone else's CA")
    return {"worker": ca.issue(directory / "ca", "worker"), "client": ca.issue(directory / "ca", "router"),
            "stranger": stranger.issue(directory / "other-ca", "intruder")}


@pytest.fixture(scope="module")
def tls_worker(pki, redis_server):
    files, health_port = pki["worker"], free_port()
    command = epd_command("worker", "--role", "encode", "--model", "tiny-llava", "--tls-cert", str(files.cert),
                          "--tls-key", str(files.key), "--tls-ca", str(files.ca), "--health-port", str(health_port))
    with ProcessGroup(quiet=True) as group:
        worker = group.start("worker", command, "EPD_WORKER_READY",
                             {"EPD_REDIS_URL": redis_server.url})  # no --redis-url: env
        group.wait_ready([worker], 120)
        yield worker.ready_fields["address"], health_port


def _channel(address: str, files=None, trust=None) -> grpc.Channel:
    if files is None and trust is None:
        return grpc.insecure_channel(address)
    ca = Path(trust).read_bytes()
    if files is None:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=files.key.read_bytes(), certificate_chain=files.cert.read_bytes()))


def _fetch(channel: grpc.Channel) -> grpc.StatusCode:
    """FetchEmbedding, the call that would leak another user's image embedding."""
    try:
        pb_grpc.EncodeServiceStub(channel).FetchEmbedding(pb.FetchEmbeddingRequest(item_key="someone-else"),
                                                          timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_calls_without_a_valid_client_certificate_are_refused(tls_worker, pki):
    address, _ = tls_worker
    ca = pki["worker"].ca
    with _channel(address) as plaintext:
        assert _fetch(plaintext) == grpc.StatusCode.UNAVAILABLE
    with _channel(address, trust=ca) as no_client_cert:
        assert _fetch(no_client_cert) == grpc.StatusCode.UNAVAILABLE
    with _channel(address, files=pki["stranger"], trust=ca) as wrong_ca:
        assert _fetch(wrong_ca) == grpc.StatusCode.UNAVAILABLE
    with _channel(address, files=pki["client"], trust=ca) as trusted:
        assert _fetch(trusted) == grpc.StatusCode.NOT_FOUND  # through the handshake: the item is not held
        assert pb_grpc.EncodeServiceStub(trusted).Cancel(pb.CancelRequest(request_id="nobody"),
                                                         timeout=10).cancelled is False


def test_reflection_is_off_by_default(tls_worker, pki):
    address, _ = tls_worker
    with _channel(address, files=pki["client"], trust=pki["worker"].ca) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_probes_get_plaintext_health_on_its_own_port(tls_worker):
    _, health_port = tls_worker
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert _fetch(channel) == grpc.StatusCode.UNIMPLEMENTED  # nothing but health there


@pytest.mark.parametrize("kv_path", ["shm", "tcp"])
def test_epd_serve_with_tls_serves_end_to_end(redis_server, kv_path):
    served = start_serve("tiny-llava", redis_server, "--tls", "--quiet", f"--worker-arg=--kv-paths={kv_path}")
    try:
        client = openai.OpenAI(base_url=served.base_url, api_key="unused")
        reply = client.chat.completions.create(model="tiny-llava", max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Hello"}],
                                               extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 4
        for stage in ("encode", "prefill", "decode"):
            with grpc.insecure_channel(served.workers(stage)[0].address) as plaintext:
                assert _fetch(plaintext) == grpc.StatusCode.UNAVAILABLE, stage
        # the KV went over the chosen path (the tcp one wrapped in the same mutual TLS)
        metrics = urllib.request.urlopen(served.workers("prefill")[0].metrics_url, timeout=10).read().decode()
        sent = [line for line in metrics.splitlines()
                if line.startswith("epd_transfer_bytes_total") and f'path="{kv_path}"' in line and 'kind="kv"' in line]
        assert sent and float(sent[0].split()[-1]) > 0, metrics
    finally:
        served.stop()
