"""Least privilege and hardening against the real apiserver: every pod passes
Pod Security `restricted` (enforced by the apiserver's admission), the
operator cannot read a Secret anywhere, TLS comes from a per-deployment CA or
from cert-manager, and every verb the chart grants is one the operator was
seen using (the apiserver's audit log)."""

from __future__ import annotations

import copy

import pytest
import yaml
from cryptography import x509

from .conftest import CHART
from .controlplane import wait_for
from .operator_process import SERVICE_ACCOUNT, SYSTEM
from .resources import STAGES, children, epd, events, minimal, ready
from .thirdparty import CERT_MANAGER, install, uninstall

pytestmark = pytest.mark.controlplane
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


def restricted_namespace(k8s_cluster, namespace: str) -> None:
    k8s_cluster.kubectl("label", "namespace", namespace, RESTRICTED, "pod-security.kubernetes.io/enforce-version=latest")
    bare = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"},
            "spec": {"containers": [{"name": "c", "image": "example.invalid/none"}]}}
    refused = k8s_cluster.apply(bare, namespace=namespace, check=False)
    assert refused.returncode != 0 and 'violates PodSecurity "restricted:latest"' in refused.stderr  # enforced


def test_every_pod_is_admitted_under_pod_security_restricted(k8s_cluster, operator, namespace):
    restricted_namespace(k8s_cluster, namespace)
    k8s_cluster.kubectl("create", "secret", "generic", "keys", "-n", namespace, "--from-literal=api-keys=k1,k2")
    k8s_cluster.apply(minimal(router={"apiKeySecret": "keys"}, model={"name": "org/model", "revision": "main"}),
                      namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 90, "Ready with every pod admitted")
    pods = k8s_cluster.get("pods", "-n", namespace)["items"]
    assert sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods) == \
        ["decode", "encode", "prefill", "redis", "router"]
    refusals = [e for e in k8s_cluster.get("events", "-n", namespace)["items"] if e["reason"] == "FailedCreate"]
    assert not refusals, [e["message"] for e in refusals]


def test_the_operators_own_pod_is_admitted_under_restricted(k8s_cluster, namespace):
    restricted_namespace(k8s_cluster, namespace)
    rendered = k8s_cluster.helm("template", "epd", str(CHART), "--namespace", namespace).stdout
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "operator"},
           "spec": {**deployment["spec"]["template"]["spec"], "serviceAccountName": "default"}}
    admitted = k8s_cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))
    assert "pod/operator created (server dry run)" in admitted.stdout


def can_i(k8s_cluster, operator, *args: str) -> str:
    return k8s_cluster.kubectl("auth", "can-i", *args, kubeconfig=operator.kubeconfig, check=False).stdout.strip()


def test_the_operator_cannot_read_secrets_or_touch_what_it_does_not_own(k8s_cluster, operator, namespace):
    for verb in ("get", "list", "watch"):
        assert can_i(k8s_cluster, operator, verb, "secrets", "-n", "kube-system") == "no", verb
        assert can_i(k8s_cluster, operator, verb, "secrets", "-n", namespace) == "no", verb
    assert can_i(k8s_cluster, operator, "create", "secrets", "-n", namespace) == "yes"  # only what it generates
    for verb, resource in (("delete", "deployments"), ("delete", "configmaps"), ("get", "pods"),
                           ("patch", "epddeployments"), ("delete", "epddeployments"),
                           ("update", "epddeployments/finalizers"), ("delete", "secrets"), ("patch", "secrets")):
        assert can_i(k8s_cluster, operator, verb, resource, "-n", namespace) == "no", (verb, resource)
    k8s_cluster.kubectl("create", "secret", "generic", "canary", "-n", namespace, "--from-literal=x=y")
    refused = k8s_cluster.kubectl("get", "secret", "canary", "-n", namespace, kubeconfig=operator.kubeconfig,
                                  check=False)
    assert "forbidden" in refused.stderr


def test_workers_get_mutual_tls_from_their_own_ca_and_no_reflection(k8s_cluster, operator, namespace):
    k8s_cluster.apply(minimal(), namespace=namespace)
    wait_for(lambda: ready(k8s_cluster, namespace, "tiny"), 60, "Ready")
    secret = k8s_cluster.get("secret", "tiny-tls", "-n", namespace)
    import base64

    leaf = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    leaf.verify_directly_issued_by(ca)
    assert epd(k8s_cluster, namespace, "tiny")["status"]["tls"]["serial"] == format(leaf.serial_number, "x")
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    for pod in k8s_cluster.get("pods", "-n", namespace, "-l", "app.kubernetes.io/instance=tiny")["items"]:
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "redis":
            continue
        container = pod["spec"]["containers"][0]
        assert {"name": "tls", "mountPath": "/etc/epd/tls", "readOnly": True} in container["volumeMounts"]
        assert "--tls-ca" in container["command"] and "--grpc-reflection" not in container["command"]
        if component in STAGES:  # the address peers dial is a name on the certificate
            assert f"*.tiny-{component}.{namespace}.svc" in names


def granted(k8s_cluster) -> set[tuple[str, str, str]]:
    rendered = k8s_cluster.helm("template", "epd", str(CHART), "--namespace", SYSTEM).stdout
    rules = [rule for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] in ("ClusterRole", "Role")
             for rule in doc["rules"]]
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def used(k8s_cluster) -> set[tuple[str, str, str]]:
    """What the operator's ServiceAccount was authorised to do, from the audit log. A server-side
    apply that created its object needed `create` as well as `patch`."""
    found = set()
    for event in k8s_cluster.audit_events(f"system:serviceaccount:{SYSTEM}:{SERVICE_ACCOUNT}"):
        ref, code = event.get("objectRef"), event.get("responseStatus", {}).get("code", 0)
        if not ref or code in (401, 403):
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        found.add((ref.get("apiGroup", ""), resource, event["verb"]))
        if event["verb"] == "patch" and code == 201:
            found.add((ref.get("apiGroup", ""), resource, "create"))
    return found


def test_cert_manager_and_every_granted_verb_in_use(k8s_cluster, operator, namespace):
    """One life of a deployment exercising every path (cert-manager, scaling, prune, a missing Secret);
    then the audit log must show each verb the chart grants."""
    crds = install(k8s_cluster, CERT_MANAGER)
    try:
        spec = {"tls": {"provider": "cert-manager"}, "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3},
                "autoscaling": {"enabled": True, "windowSeconds": 1}}
        k8s_cluster.apply(minimal(**spec), namespace=namespace)
        made = wait_for(lambda: {"Issuer/tiny-selfsigned", "Issuer/tiny-ca", "Certificate/tiny-ca",
                                 "Certificate/tiny-tls"} <= set(found := cert_manager_objects(k8s_cluster, namespace))
                        and found, 60, "the cert-manager objects")
        assert made["Certificate/tiny-tls"]["spec"]["issuerRef"]["name"] == "tiny-ca"
        wait_for(lambda: epd(k8s_cluster, namespace, "tiny").get("status", {}).get("tls", {}).get("issuedBy")
                 == "cert-manager", 30, "status names cert-manager")
        assert not [s for s in k8s_cluster.get("secrets", "-n", namespace)["items"]
                    if s["metadata"]["name"] == "tiny-tls"]  # cert-manager writes it, not the operator
        later = copy.deepcopy(spec)
        later["decode"]["replicas"] = 2  # written through to the EPDStage's /scale
        later["cache"] = {"redis": {"urlSecret": "later"}}  # prunes the managed Redis; a missing Secret first
        later["tls"] = {"provider": "operator"}  # prunes the Certificates and Issuers
        k8s_cluster.apply(minimal(**later), namespace=namespace)
        wait_for(lambda: events(k8s_cluster, namespace, "tiny", "SecretNotFound"), 30, "SecretNotFound")
        k8s_cluster.kubectl("create", "secret", "generic", "later", "-n", namespace,
                            "--from-literal=url=redis://:pw@r:6379")
        wait_for(lambda: not cert_manager_objects(k8s_cluster, namespace) and "StatefulSet/tiny-redis" not in
                 children(k8s_cluster, namespace, "tiny") and ready(k8s_cluster, namespace, "tiny"), 60,
                 "pruned and Ready")
        assert k8s_cluster.get("epdstage", "tiny-decode", "-n", namespace)["spec"]["replicas"] == 2
    finally:
        uninstall(k8s_cluster, crds)
    unused = granted(k8s_cluster) - used(k8s_cluster)
    assert not unused, f"the chart grants what the operator never used: {sorted(unused)}"


def cert_manager_objects(k8s_cluster, namespace: str) -> dict[str, dict]:
    found = {}
    for kind in ("certificates.cert-manager.io", "issuers.cert-manager.io"):
        for item in k8s_cluster.get(kind, "-n", namespace)["items"]:
            found[f"{item['kind']}/{item['metadata']['name']}"] = item
    return found
