"""Redis with a password, over TLS (`rediss://`), as an operator-managed or external
Redis is: a real worker process and the router register and read through it, the URL
coming from `EPD_REDIS_URL` (kept off the command line) or from `--redis-url`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import redis

from epd.workers.launcher.processes import Child, ProcessGroup, epd_command, free_port
from epd.workers.registry import KEY_PREFIX
from epd.workers.security.certs import CertificateAuthority

from ..conftest import wait_until

PASSWORD = "s3cret-redis-pw"


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory):
    """redis-server requiring a password, on a plain port and a TLS port."""
    directory = tmp_path_factory.mktemp("redis-tls")
    ca = CertificateAuthority.create(directory)
    server = ca.issue(directory, "redis")
    plain, tls = free_port(), free_port()
    process = subprocess.Popen([shutil.which("redis-server"), "--port", str(plain), "--tls-port", str(tls),
                                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--requirepass", PASSWORD, "--tls-cert-file", str(server.cert),
                                "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(ca.path),
                                "--tls-auth-clients", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=plain, password=PASSWORD)
    wait_until(lambda: _pings(client), 15, message="the password-protected redis-server")
    yield {"plain": f"redis://:{PASSWORD}@127.0.0.1:{plain}/0",
           "tls": f"rediss://:{PASSWORD}@127.0.0.1:{tls}/0?ssl_ca_certs={ca.path}", "client": client}
    process.terminate()
    process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def started(command: list[str], env: dict[str, str], marker: str) -> Child:
    """`command` running and past its READY line; its whole output is kept."""
    group = ProcessGroup(quiet=True, keep_lines=None)
    child = group.start(marker.removeprefix("EPD_").removesuffix("_READY").lower(), command, marker, env)
    group.wait_ready([child], 120)
    return child


def stopped(child: Child) -> str:
    """Stop `child`; its output."""
    ProcessGroup.stop_child(child, grace=30)
    return child.output()


def router_health(url: str) -> tuple[Child, dict]:
    port = free_port()
    router = started(epd_command("router", "--port", str(port), "--metrics-port", "0", "--redis-url", url), {},
                     "EPD_ROUTER_READY")
    body = wait_until(lambda: (b := httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json())
                      and b["redis"] == "ok" and b, 30, message="the router to read Redis")
    return router, body


@pytest.mark.parametrize("scheme", ["plain", "tls"])
def test_workers_and_router_use_a_password_protected_redis(secured_redis, scheme):
    url = secured_redis[scheme]
    worker = started(epd_command("worker", "--role", "encode"), {"EPD_REDIS_URL": url}, "EPD_WORKER_READY")
    try:
        assert PASSWORD.encode() not in Path(f"/proc/{worker.process.pid}/cmdline").read_bytes()
        address = worker.ready_fields["address"]
        wait_until(lambda: secured_redis["client"].exists(KEY_PREFIX + f"encode:{address}"), 15,
                   message="the worker's registration")
        router, health = router_health(url)
        router_log = stopped(router)
        assert health["reason"] == "no live prefill, decode worker"  # it sees the encode worker, through Redis
        assert PASSWORD not in router_log
    finally:
        worker_log = stopped(worker)
    assert PASSWORD not in worker_log


def test_a_wrong_password_leaves_the_router_up_but_reporting_redis_unreachable(secured_redis):
    port = free_port()
    wrong = secured_redis["plain"].replace(PASSWORD, "not-it")
    router = started(epd_command("router", "--port", str(port), "--metrics-port", "0"), {"EPD_REDIS_URL": wrong},
                     "EPD_ROUTER_READY")
    try:
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert health.status_code == 503 and health.json()["redis"] == "unreachable"
    finally:
        log = stopped(router)
    assert "not-it" not in log
