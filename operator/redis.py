"""Redis for discovery and cache metadata: the operator-managed one (a
StatefulSet with a generated password) or an external one whose URL, password
and TLS come from the user's Secret."""

from __future__ import annotations

import secrets
from typing import Any

from .naming import REDIS_PORT, Owner, child_name, labels, meta, selector
from .security import CONTAINER_SECURITY, POD_SECURITY
from .spec import EPDDeploymentSpec

REDIS_UID = 999  # the redis image's user
REDIS_CA_DIR = "/etc/epd/redis-tls"  # `ca.crt` of an external Secret, for rediss://...?ssl_ca_certs=


def auth_secret_name(owner: Owner) -> str:
    return child_name(owner, "redis-auth")


def auth_secret(owner: Owner) -> dict[str, Any]:
    """Made once (create-only: the operator never reads Secrets back), kept until the owner is deleted."""
    password = secrets.token_urlsafe(32)
    host = f"{child_name(owner, 'redis')}.{owner.namespace}.svc"
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta(owner, auth_secret_name(owner),
                                                                                    "redis"),
            "stringData": {"password": password, "url": f"redis://:{password}@{host}:{REDIS_PORT}/0"}}


def url_env(owner: Owner, spec: EPDDeploymentSpec) -> dict[str, Any]:
    """EPD_REDIS_URL from a Secret, so the password is in no pod spec and no command line."""
    secret = auth_secret_name(owner) if spec.cache.managed_redis else spec.cache.redis_url_secret
    return {"name": "EPD_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": secret, "key": "url"}}}


def ca_volume(spec: EPDDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """An external Secret's optional `ca.crt`, mounted for rediss:// (volumes, mounts)."""
    if spec.cache.managed_redis:
        return [], []
    volume = {"name": "redis-tls", "secret": {"secretName": spec.cache.redis_url_secret, "optional": True,
                                              "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
    return [volume], [{"name": "redis-tls", "mountPath": REDIS_CA_DIR, "readOnly": True}]


def statefulset(owner: Owner) -> dict[str, Any]:
    name = child_name(owner, "redis")
    password = {"name": "REDIS_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": auth_secret_name(owner), "key": "password"}}}
    container = {"name": "redis", "image": "redis:7-alpine", "env": [password],
                 "args": ["--requirepass", "$(REDIS_PASSWORD)", "--save", "", "--appendonly", "no"],
                 "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                 "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
                 "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}},
                 "securityContext": {**CONTAINER_SECURITY, "runAsUser": REDIS_UID, "runAsGroup": REDIS_UID},
                 "terminationMessagePolicy": "FallbackToLogsOnError",
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta(owner, name, "redis"),
            "spec": {"replicas": 1, "serviceName": name, "selector": {"matchLabels": selector(owner, "redis")},
                     "template": {"metadata": {"labels": labels(owner, "redis")},
                                  "spec": {"containers": [container], "automountServiceAccountToken": False,
                                           "securityContext": {**POD_SECURITY, "fsGroup": REDIS_UID},
                                           "volumes": [{"name": "data", "emptyDir": {}}]}}}}


def service(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(owner, child_name(owner, "redis"), "redis"),
            "spec": {"selector": selector(owner, "redis"), "ports": [{"name": "redis", "port": REDIS_PORT}]}}
