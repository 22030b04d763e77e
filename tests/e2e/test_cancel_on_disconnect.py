"""A client that disconnects, streaming or not, has its request cancelled at whichever
stage holds it: the router notices the closed connection and sends `Cancel` there."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from ..conftest import wait_until
from .harness import chat_body, png_bytes, start_serve

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def served(redis_server):
    # Encode waits up to 20 s to fill a batch: an image request stays held at encode (and its
    # prefill waits for the embedding) long enough to leave while it is there.
    server = start_serve(MODEL, redis_server, "--quiet", "--worker-arg=--encode-max-wait=20")
    yield server
    server.stop()


def send(served, body: dict) -> socket.socket:
    """Post a request on a raw connection (closing it is the client going away)."""
    url = urlsplit(served.base_url)
    data = json.dumps(body).encode()
    connection = socket.create_connection((url.hostname, url.port), timeout=60)
    connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return connection


def in_flight(served, stage: str) -> float:
    return served.stage_metric(stage, "epd_stage_in_flight")


def counters(served) -> dict[str, float]:
    return {"cancelled": served.router_metric("epd_requests_total", outcome="cancelled"),
            **{stage: served.router_metric("epd_router_cancels_total", stage=stage)
               for stage in ("encode", "prefill", "decode")}}


def still_serving(served) -> None:
    reply = httpx.post(served.base_url + "/chat/completions", json=chat_body(MODEL, "Still there?", []), timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
    assert served.router_metric("epd_router_in_flight") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_during_decode_stops_its_generation(served, stream):
    before = counters(served)
    connection = send(served, chat_body(MODEL, "Tell me a very long story.", [], max_tokens=3500, stream=stream))
    if stream:
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")  # headers and the first events came
    wait_until(lambda: in_flight(served, "decode") > 0, 60, message="decode to hold the request")
    connection.close()
    wait_until(lambda: counters(served)["decode"] == before["decode"] + 1, 30,
               message="the router to cancel the request at decode")
    wait_until(lambda: in_flight(served, "decode") == 0, 30, message="decode to drop the request")
    assert counters(served)["cancelled"] == before["cancelled"] + 1
    still_serving(served)


def test_a_client_that_leaves_while_its_image_is_being_encoded_is_cancelled_at_encode(served):
    before = counters(served)
    body = chat_body(MODEL, "What is this?", [png_bytes(40, 40, seed=4711)], max_tokens=8)
    connection = send(served, body)
    wait_until(lambda: in_flight(served, "encode") > 0 and in_flight(served, "prefill") > 0, 60,
               message="the request to be held at encode, with prefill waiting for it")
    connection.close()
    wait_until(lambda: counters(served)["encode"] == before["encode"] + 1, 30,
               message="the router to cancel the request at encode")
    wait_until(lambda: in_flight(served, "encode") == 0 and in_flight(served, "prefill") == 0, 30,
               message="encode and prefill to let the request go")
    assert counters(served)["cancelled"] == before["cancelled"] + 1
    assert in_flight(served, "decode") == 0
    still_serving(served)
