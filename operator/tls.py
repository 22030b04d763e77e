"""Mutual TLS between the router and the workers and among workers: one
certificate per EPDDeployment (server and client use), signed either by a CA
the operator makes for that deployment alone (its key is never stored, so no
other deployment's pods are trusted) or by cert-manager when it is installed.
The pods mount the Secret at /etc/epd/tls."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from epd.stages import STAGES

from .naming import Owner, child_name, meta
from .spec import EPDDeploymentSpec

TLS_DIR = "/etc/epd/tls"
VALIDITY = datetime.timedelta(days=3 * 365)  # rotation: delete the Secret, the operator issues a new pair
CERT_MANAGER = "cert-manager.io/v1"


@dataclass(frozen=True)
class IssuedSecret:
    body: dict[str, Any]
    serial: str
    not_after: str


def secret_name(owner: Owner) -> str:
    return child_name(owner, "tls")


def dns_names(owner: Owner) -> list[str]:
    """Every worker's stable name (pod.<stage service>.<ns>.svc[.cluster.local]) and the router's Service."""
    names = []
    for stage in STAGES:
        service = f"{child_name(owner, stage)}.{owner.namespace}.svc"
        names += [f"*.{service}", service, f"*.{service}.cluster.local"]
    return names + [f"{owner.name}.{owner.namespace}.svc", f"{child_name(owner, 'router')}.{owner.namespace}.svc"]


def flags() -> list[str]:
    return ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key", "--tls-ca", f"{TLS_DIR}/ca.crt"]


def volume(owner: Owner) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({"name": "tls", "secret": {"secretName": secret_name(owner), "defaultMode": 0o440}},
            {"name": "tls", "mountPath": TLS_DIR, "readOnly": True})


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def issue(owner: Owner, now: datetime.datetime | None = None) -> IssuedSecret:
    """A fresh CA and the deployment's certificate, as a kubernetes.io/tls Secret (ca.crt included)."""
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"epd {owner.namespace}/{owner.name} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + VALIDITY)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{owner.name}.{owner.namespace}")])
    leaf = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names(owner)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
    body = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": meta(owner, secret_name(owner), "tls"),
            "stringData": {"tls.crt": _pem(leaf), "tls.key": key_pem, "ca.crt": _pem(ca)}}
    return IssuedSecret(body, format(leaf.serial_number, "x"), leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"))


def cert_manager_objects(owner: Owner, spec: EPDDeploymentSpec) -> list[dict[str, Any]]:
    """Certificate (and, without an issuerRef, a self-signed CA chain of this deployment's own)."""
    objects = []
    issuer = {"name": spec.tls.issuer_name, "kind": spec.tls.issuer_kind, "group": "cert-manager.io"}
    if not spec.tls.issuer_name:
        selfsigned, ca = child_name(owner, "selfsigned"), child_name(owner, "ca")
        objects += [
            _cm(owner, "Issuer", selfsigned, {"selfSigned": {}}),
            _cm(owner, "Certificate", ca, {"isCA": True, "commonName": f"epd {owner.namespace}/{owner.name} CA",
                                           "secretName": ca, "privateKey": {"algorithm": "ECDSA", "size": 256},
                                           "issuerRef": {"name": selfsigned, "kind": "Issuer",
                                                         "group": "cert-manager.io"}}),
            _cm(owner, "Issuer", ca, {"ca": {"secretName": ca}}),
        ]
        issuer = {"name": ca, "kind": "Issuer", "group": "cert-manager.io"}
    objects.append(_cm(owner, "Certificate", secret_name(owner), {
        "secretName": secret_name(owner), "commonName": f"{owner.name}.{owner.namespace}", "dnsNames": dns_names(owner),
        "usages": ["server auth", "client auth", "digital signature", "key encipherment"],
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}, "issuerRef": issuer}))
    return objects


def _cm(owner: Owner, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": CERT_MANAGER, "kind": kind, "metadata": meta(owner, name, "tls"), "spec": spec}
