"""`epd operator`: reconcile EPDDeployments, with Lease leader election, a
liveness + metrics endpoint, and a clean exit: SIGTERM stops the watches and
the supervisor, releases the Lease and exits 0."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from http.server import ThreadingHTTPServer

import kopf
from kubernetes import client, config

from . import health, metrics
from .autoscale.controller import Autoscaler
from .autoscale.promql import Prometheus
from .cluster import Cluster
from .handlers import register
from .leader import LeaderElection
from .network import MetricsReaders
from .reconcile import Reconciler
from .supervisor import Supervisor

DEFAULT_IMAGE = "ghcr.io/epd-serve/epd-serve:0.1.0"
SHUTDOWN_SECONDS = 10  # kopf's own stop takes at most ~5 s (its hung-task timeout)
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    namespace = os.environ.get("POD_NAMESPACE", "default")
    parser.add_argument("--namespace", action="append", default=[],
                        help="namespace to watch (repeatable); default: all namespaces")
    parser.add_argument("--image", default=os.environ.get("EPD_IMAGE", DEFAULT_IMAGE),
                        help="image for workers and routers when spec.image is unset")
    parser.add_argument("--kubeconfig", default="", help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument("--lease-name", default="epd-operator")
    parser.add_argument("--lease-namespace", default=namespace)
    parser.add_argument("--no-leader-election", action="store_true", help="run without a Lease (single replica)")
    parser.add_argument("--drift-interval", type=float, default=30.0, help="seconds between drift checks")
    parser.add_argument("--autoscale-interval", type=float, default=5.0,
                        help="seconds between looks at autoscaled deployments (each decides once per window)")
    parser.add_argument("--health-host", default="0.0.0.0")
    parser.add_argument("--health-port", type=int, default=8080, help="/healthz and /metrics (0: off)")
    parser.add_argument("--operator-namespace", default=namespace,
                        help="namespace of the operator's pods (NetworkPolicies let them read workers' /metrics)")
    parser.add_argument("--metrics-namespace", action="append", default=[],
                        help="namespace whose pods may scrape the workers' /metrics, e.g. monitoring (repeatable)")
    parser.add_argument("--prometheus-url", default="",
                        help="Prometheus for autoscaling.metricsSource: prometheus when the spec names none")
    parser.add_argument("--prometheus-token-file", default="",
                        help="bearer token sent to --prometheus-url (and to no other URL)")


def _api_client(kubeconfig: str) -> client.ApiClient:
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's own login reads it too
        config.load_kube_config(kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    return client.ApiClient()


def build_supervisor(args: argparse.Namespace, api: client.ApiClient, liveness: health.Liveness) -> Supervisor:
    cluster = Cluster(api)
    readers = MetricsReaders(args.operator_namespace, tuple(args.metrics_namespace))
    prometheus = Prometheus(args.prometheus_url, args.prometheus_token_file) if args.prometheus_url else None
    return Supervisor(Reconciler(cluster, args.image, readers), Autoscaler(cluster, prometheus=prometheus),
                      args.drift_interval, args.autoscale_interval,
                      beat=lambda: liveness.beat("supervisor", max(60.0, 3 * args.drift_interval)))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # not a line per watch event
    try:
        api = _api_client(args.kubeconfig)
    except (config.ConfigException, OSError) as exc:
        print(f"epd operator: no Kubernetes credentials: {exc}", file=sys.stderr)
        return 2
    liveness = health.Liveness()
    server = health.serve(args.health_host, args.health_port, liveness) if args.health_port else None
    stop, lost = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    election = None
    if not args.no_leader_election:
        identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        election = LeaderElection(client.CoordinationV1Api(api), args.lease_name, args.lease_namespace, identity,
                                  beat=lambda: liveness.beat("lease", 30.0))
        print(f"EPD_OPERATOR_WAITING identity={identity}", flush=True)
        if not election.wait_for_leadership(stop):
            return _exit(server, 0)
        threading.Thread(target=_step_down_when_lost, args=(election, lost, stop), daemon=True).start()
    metrics.LEADER.set(1)
    print("EPD_OPERATOR_LEADING", flush=True)
    supervisor = build_supervisor(args, api, liveness)
    loop = threading.Thread(target=supervisor.run, args=(stop,), name="supervisor", daemon=True)
    loop.start()
    watches = threading.Thread(target=_run_kopf, args=(supervisor, args.namespace, stop), name="kopf", daemon=True)
    watches.start()
    while not stop.wait(1.0):
        if not watches.is_alive():  # kopf ended on its own: nothing is watched any more
            log.error("the watches ended; stopping")
            lost.set()
            stop.set()
    watches.join(SHUTDOWN_SECONDS)
    supervisor.wake.set()
    loop.join(SHUTDOWN_SECONDS)
    metrics.LEADER.set(0)
    if election is not None and not lost.is_set():
        election.release()
    return _exit(server, 1 if lost.is_set() else 0)


def _run_kopf(supervisor: Supervisor, namespaces: list[str], stop: threading.Event) -> None:
    registry = kopf.OperatorRegistry()
    register(supervisor, registry)
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False  # the supervisor posts its own Events
    settings.process.ultimate_exiting_timeout = None  # no self-SIGKILL: the main thread decides the exit
    settings.background.instant_exit_timeout = 0.1
    scope = {"namespaces": namespaces} if namespaces else {"clusterwide": True}
    kopf.run(registry=registry, settings=settings, standalone=True, stop_flag=stop, **scope)


def _exit(server: ThreadingHTTPServer | None, code: int) -> int:
    if server is not None:
        server.shutdown()
    print(f"EPD_OPERATOR_EXIT code={code}", flush=True)
    return code


def _step_down_when_lost(election: LeaderElection, lost: threading.Event, stop: threading.Event) -> None:
    election.keep_renewing(lost, stop)
    if lost.is_set():
        stop.set()
