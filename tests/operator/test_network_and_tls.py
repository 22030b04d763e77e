"""NetworkPolicies (who may reach what) and the operator-made certificates
(a per-deployment CA, one leaf for server and client use, the stable names)."""

from __future__ import annotations

import datetime
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from epd.operator import network, tls
from epd.operator.naming import Owner
from epd.stages import STAGES

OWNER = Owner("llava", "prod", "uid-1")
READERS = network.MetricsReaders("epd-system", ("monitoring",))


def sources(policy: dict, port: int) -> list[dict]:
    return [peer for rule in policy["spec"]["ingress"] if {"port": port} in rule["ports"] for peer in rule.get("from", [])]


def components(peers: list[dict]) -> set[str]:
    return {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers
            if "namespaceSelector" not in p}


def test_only_the_router_and_the_neighbouring_stages_reach_a_workers_grpc():
    reached = {stage: components(sources(network.stage_policy(OWNER, stage, READERS), 50051))
               for stage in STAGES}
    assert reached == {"encode": {"router", "prefill"}, "prefill": {"router", "encode"},
                       "decode": {"router", "prefill"}}
    policy = network.stage_policy(OWNER, "decode", READERS)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "llava",
                                                           "app.kubernetes.io/component": "decode"}
    for peer in sources(policy, 50051):  # a pod selector alone: this namespace, this deployment
        assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "llava"


def test_only_prefill_reaches_decodes_tcp_kv_port():
    reached = {stage: components(sources(network.stage_policy(OWNER, stage, READERS), 50053)) for stage in STAGES}
    assert reached == {"encode": set(), "prefill": set(), "decode": {"prefill"}}


def test_metrics_are_for_the_operator_and_the_named_scrapers():
    peers = sources(network.stage_policy(OWNER, "encode", READERS), 9090)
    assert peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "epd-system"}},
                      "podSelector": {"matchLabels": {"app.kubernetes.io/name": "epd-serve",
                                                      "app.kubernetes.io/component": "operator"}}},
                     {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    router = network.router_policy(OWNER, 8000, 9100, READERS)
    assert router["spec"]["ingress"][0] == {"ports": [{"port": 8000}]}  # the public door: from anywhere
    assert sources(router, 9100) == peers


def test_only_the_deployment_reaches_its_redis():
    rule, = network.redis_policy(OWNER)["spec"]["ingress"]
    assert rule == {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "llava",
                                                              "app.kubernetes.io/managed-by": "epd-operator"}}}],
                    "ports": [{"port": 6379}]}


def test_issued_certificate_chains_to_its_own_ca_and_names_every_worker(tmp_path):
    issued = tls.issue(OWNER)
    data = issued.body["stringData"]
    assert issued.body["type"] == "kubernetes.io/tls" and issued.body["metadata"]["name"] == "llava-tls"
    leaf = x509.load_pem_x509_certificate(data["tls.crt"].encode())
    ca = x509.load_pem_x509_certificate(data["ca.crt"].encode())
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert "*.llava-decode.prod.svc" in names and "llava-encode.prod.svc" in names
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert format(leaf.serial_number, "x") == issued.serial
    assert leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=365)
    # a TLS stack accepts the pair and the CA as they are mounted
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).write_text(data[name])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
    context.load_cert_chain(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))


def test_every_deployment_gets_a_ca_of_its_own():
    one, other = tls.issue(OWNER), tls.issue(Owner("other", "prod", "uid-2"))
    assert one.body["stringData"]["ca.crt"] != other.body["stringData"]["ca.crt"]
    assert set(one.body["stringData"]) == {"tls.crt", "tls.key", "ca.crt"}  # the CA key is never stored
