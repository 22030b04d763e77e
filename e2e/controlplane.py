"""A real Kubernetes control plane on loopback for tests: etcd, kube-apiserver
(RBAC on, service-account tokens), kube-controller-manager, kube-scheduler and
kwok (simulated nodes whose pods become Running and Ready), with kubectl and
helm bound to its kubeconfig. Binaries come from $KUBEBUILDER_ASSETS or from
e2e/build-controlplane.sh's cache."""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

from epd.workers.launcher.processes import free_port

from .pki import Pki, create_pki

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "helm")
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
T = TypeVar("T")


class MissingBinaries(RuntimeError):
    pass


def wait_for(condition: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll `condition` at the control plane's pace (its objects change in tenths of a second) until it
    returns something truthy, which is returned; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)  # polling a condition with a deadline
    return value


def find_binaries() -> Path:
    """$KUBEBUILDER_ASSETS if it holds every binary, else the newest build in the cache."""
    candidates = []
    if os.environ.get("KUBEBUILDER_ASSETS"):
        candidates.append(Path(os.environ["KUBEBUILDER_ASSETS"]))
    cache = Path(os.environ.get("EPD_CONTROLPLANE_CACHE", Path.home() / ".cache" / "epd-controlplane"))
    candidates += sorted((Path(p) for p in glob.glob(str(cache / "*" / "bin"))), key=os.path.getmtime, reverse=True)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in BINARIES):
            return directory
    raise MissingBinaries("control-plane binaries not found (looked in $KUBEBUILDER_ASSETS and "
                          f"{cache}); build them with: bash e2e/build-controlplane.sh")


@dataclass
class ControlPlane:
    bin_dir: Path
    workdir: Path
    server: str
    kubeconfig: Path
    pki: Pki
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": str(self.workdir / "helm"),
                "HELM_CONFIG_HOME": str(self.workdir / "helm"), "HELM_DATA_HOME": str(self.workdir / "helm")}

    def run(self, tool: str, *args: str, input: str | None = None, check: bool = True,
            kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        env = self.env()
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        result = subprocess.run([str(self.bin_dir / tool), *args], input=input, capture_output=True, text=True,
                                env=env, timeout=120, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def kubectl(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("helm", *args, **kwargs)

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: dict | str, namespace: str | None = None, **kwargs) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        scope = ("-n", namespace) if namespace else ()
        return self.kubectl("apply", *scope, "-f", "-", input=text, **kwargs)

    def crd_established(self, name: str) -> bool:
        found = self.kubectl("get", "crd", name, "-o", "json", check=False)
        conditions = json.loads(found.stdout).get("status", {}).get("conditions") or [] if found.returncode == 0 else []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def add_fake_node(self, name: str, labels: dict[str, str] | None = None, taints: list[dict] | None = None,
                      gpus: int = 0) -> None:
        """A kwok-managed node: it reports Ready and its pods become Running without any container."""
        capacity = {"cpu": "32", "memory": "256Gi", "pods": "110"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        self.apply({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                                 "labels": {"kubernetes.io/hostname": name, "type": "kwok", **(labels or {})}},
                    "spec": {"taints": taints or []},
                    "status": {"capacity": capacity, "allocatable": capacity}})

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig authenticating with a fresh token of the ServiceAccount (TokenRequest API)."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration", "2h").stdout.strip()
        _write_kubeconfig(path, self.server, self.pki.ca_cert, {"token": token})
        return path

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def audit_events(self, user: str) -> list[dict]:
        """What the apiserver recorded of `user`'s requests (service accounts are audited at Metadata)."""
        if not self.audit_log.exists():
            return []
        events = (json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip())
        return [e for e in events if e.get("user", {}).get("username") == user]

    def stop(self) -> None:
        for name in ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _audit_policy(workdir: Path) -> Path:
    """Audit every service account's requests (who called which verb on what), nothing else."""
    policy = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
              "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]}, {"level": "None"}]}
    path = workdir / "audit-policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _write_kubeconfig(path: Path, server: str, ca: Path, user: dict) -> None:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "epd",
              "clusters": [{"name": "epd", "cluster": {"server": server,
                                                        "certificate-authority-data": _b64(ca.read_bytes())}}],
              "users": [{"name": "epd", "user": user}],
              "contexts": [{"name": "epd", "context": {"cluster": "epd", "user": "epd"}}]}
    path.write_text(yaml.safe_dump(config))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def start_control_plane(deadline_seconds: float = 120.0) -> ControlPlane:
    """Start everything and wait until the apiserver is ready and the default ServiceAccount exists."""
    bin_dir = find_binaries()
    workdir = Path(tempfile.mkdtemp(prefix="epd-controlplane-"))
    pki = create_pki(workdir / "pki")
    api_port, etcd_port, peer_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = workdir / "admin.kubeconfig"
    _write_kubeconfig(kubeconfig, server, pki.ca_cert,
                      {"client-certificate-data": _b64(pki.admin_cert.read_bytes()),
                       "client-key-data": _b64(pki.admin_key.read_bytes())})
    plane = ControlPlane(bin_dir, workdir, server, kubeconfig, pki)
    logs = workdir / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> None:
        with open(logs / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            plane.processes[name] = subprocess.Popen([str(bin_dir / name), *args], stdout=log,
                                                     stderr=subprocess.STDOUT, start_new_session=True)

    try:
        start("etcd", "--data-dir", str(workdir / "etcd"), "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
              "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
              "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--unsafe-no-fsync")
        start("kube-apiserver", "--etcd-servers", f"http://127.0.0.1:{etcd_port}", "--bind-address", "127.0.0.1",
              "--advertise-address", "127.0.0.1", "--secure-port", str(api_port),
              "--tls-cert-file", str(pki.server_cert), "--tls-private-key-file", str(pki.server_key),
              "--client-ca-file", str(pki.ca_cert), "--authorization-mode", "Node,RBAC",
              "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
              "--service-account-key-file", str(pki.sa_pub), "--service-account-signing-key-file", str(pki.sa_key),
              "--service-cluster-ip-range", "10.0.0.0/24", "--allow-privileged=true",
              "--cert-dir", str(workdir / "apiserver-certs"),
              "--audit-policy-file", str(_audit_policy(workdir)), "--audit-log-path", str(plane.audit_log),
              "--audit-log-format", "json")
        _wait_ready(plane, deadline_seconds)
        start("kube-controller-manager", "--kubeconfig", str(kubeconfig), "--leader-elect=false",
              "--service-account-private-key-file", str(pki.sa_key), "--root-ca-file", str(pki.ca_cert),
              "--use-service-account-credentials=false", "--controllers=*",
              "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
              "--cluster-cidr", "10.1.0.0/16", "--allocate-node-cidrs=false")
        start("kube-scheduler", "--kubeconfig", str(kubeconfig), "--leader-elect=false",
              "--bind-address", "127.0.0.1", "--secure-port", str(free_port()))
        start("kwok", "--kubeconfig", str(kubeconfig),
              "--manage-nodes-with-annotation-selector", f"{KWOK_NODE_ANNOTATION}=fake",
              # Pod IPs on loopback (all of 127/8 is local on Linux): a test can serve a simulated
              # pod's /metrics on the pod's own address, where the operator's autoscaler reads it.
              "--node-ip", "10.0.0.1", "--cidr", "127.2.0.1/16",
              # Node Leases renewed like a kubelet's: without them kwok's ~56 s status refresh outlasts
              # the controller-manager's grace period and every node flaps NotReady (pods lose Ready).
              "--node-lease-duration-seconds", "40")
        _wait(lambda: _default_service_account(plane), deadline_seconds, "the default ServiceAccount", plane)
    except BaseException:
        plane.stop()
        raise
    return plane


def _wait(condition, timeout: float, what: str, plane: ControlPlane) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for name, process in plane.processes.items():
            if process.poll() is not None:
                tail = (plane.workdir / "logs" / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} exited with code {process.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)  # polling a condition with a deadline


def _wait_ready(plane: ControlPlane, timeout: float) -> None:
    context = ssl.create_default_context(cafile=str(plane.pki.ca_cert))
    context.load_cert_chain(str(plane.pki.admin_cert), str(plane.pki.admin_key))

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{plane.server}/readyz", context=context, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    _wait(ready, timeout, "kube-apiserver /readyz", plane)


def _default_service_account(plane: ControlPlane) -> bool:
    return plane.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0
