"""Ports handed to child processes stay clear of the kernel's ephemeral range, so
no socket bound to port 0 while `epd serve` starts (UCX's listeners, a KV
listener) can take one first: the "address already in use" a suite run met once."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from epd.workers.launcher.processes import EPHEMERAL_RANGE, free_port


@pytest.mark.skipif(not Path(EPHEMERAL_RANGE).exists(), reason="Linux only: elsewhere the kernel chooses")
def test_free_ports_are_below_the_ephemeral_range_distinct_and_bindable():
    low = int(Path(EPHEMERAL_RANGE).read_text().split()[0])
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < low for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))
