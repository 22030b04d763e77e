"""`epd operator`: reconcile EPDDeployments (kopf), with Lease leader election."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import uuid

import kopf
from kubernetes import client, config

from .autoscale.controller import Autoscaler
from .cluster import Cluster
from .handlers import register
from .leader import LeaderElection
from .reconcile import Reconciler

DEFAULT_IMAGE = "ghcr.io/epd-serve/epd-serve:0.1.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", action="append", default=[],
                        help="namespace to watch (repeatable); default: all namespaces")
    parser.add_argument("--image", default=os.environ.get("EPD_IMAGE", DEFAULT_IMAGE),
                        help="image for workers and routers when spec.image is unset")
    parser.add_argument("--kubeconfig", default="", help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument("--lease-name", default="epd-operator")
    parser.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    parser.add_argument("--no-leader-election", action="store_true", help="run without a Lease (single replica)")
    parser.add_argument("--drift-interval", type=float, default=30.0, help="seconds between drift checks")
    parser.add_argument("--autoscale-interval", type=float, default=5.0,
                        help="seconds between looks at autoscaled deployments (each decides once per window)")


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


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        api = _api_client(args.kubeconfig)
    except (config.ConfigException, OSError) as exc:
        print(f"epd operator: no Kubernetes credentials: {exc}", file=sys.stderr)
        return 2
    registry = kopf.OperatorRegistry()
    cluster = Cluster(api)
    register(Reconciler(cluster, args.image), registry, args.drift_interval, Autoscaler(cluster),
             args.autoscale_interval)
    stop, lost = threading.Event(), threading.Event()
    if not args.no_leader_election:
        identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        election = LeaderElection(client.CoordinationV1Api(api), args.lease_name, args.lease_namespace, identity)
        print(f"EPD_OPERATOR_WAITING identity={identity}", flush=True)
        if not election.wait_for_leadership(stop):
            return 0
        threading.Thread(target=_step_down_when_lost, args=(election, lost, stop), daemon=True).start()
    print("EPD_OPERATOR_LEADING", flush=True)
    scope = {"namespaces": args.namespace} if args.namespace else {"clusterwide": True}
    settings = kopf.OperatorSettings()
    settings.process.ultimate_exiting_timeout = 5  # never hang on shutdown
    settings.background.instant_exit_timeout = 0.1
    settings.posting.level = logging.INFO  # our own Events (Reconciled, Scaled, ...) are Normal ones
    settings.posting.loggers = False  # but kopf's handler logs (a timer's "succeeded" every tick) are not Events
    kopf.run(registry=registry, settings=settings, standalone=True, stop_flag=stop, **scope)
    return 1 if lost.is_set() else 0


def _step_down_when_lost(election: LeaderElection, lost: threading.Event, stop: threading.Event) -> None:
    election.keep_renewing(lost, stop)
    if lost.is_set():
        stop.set()
