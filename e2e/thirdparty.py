"""Third-party CRDs (Prometheus Operator, cert-manager) for the harness's
apiserver, fetched by e2e/fetch-crds.sh from their Go modules."""

from __future__ import annotations

import functools
import subprocess
from functools import cache
from pathlib import Path

from .controlplane import ControlPlane, wait_for

SCRIPT = Path(__file__).resolve().parent / "fetch-crds.sh"
MONITORING = ("monitoring.coreos.com_podmonitors.yaml", "monitoring.coreos.com_servicemonitors.yaml")
CERT_MANAGER = ("cert-manager.io_certificates.yaml", "cert-manager.io_issuers.yaml")


@cache
def crd_dir() -> Path:
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fetch-crds.sh failed: {result.stderr[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def install(plane: ControlPlane, files: tuple[str, ...]) -> list[str]:
    """Install the CRDs (server-side: some are too large for a last-applied annotation); their names."""
    names = []
    for name in files:
        plane.kubectl("apply", "--server-side", "-f", str(crd_dir() / name))
        names.append(name.split("_", 1)[1].removesuffix(".yaml") + "." + name.split("_", 1)[0])
    for crd in names:  # (`kubectl wait` fails outright while a new CRD has no conditions yet)
        wait_for(functools.partial(plane.crd_established, crd), 60, f"{crd} established")
    return names


def uninstall(plane: ControlPlane, names: list[str]) -> None:
    plane.kubectl("delete", "crd", *names, "--wait=true", "--timeout=60s")
