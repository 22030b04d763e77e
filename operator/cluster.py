"""The operator's only door to the cluster: server-side apply with one field
manager, reads, create-only Secrets (the operator never reads a Secret),
prune deletes, scale and status writes, and Events. Synchronous (kubernetes
client), called from the supervisor's thread."""

from __future__ import annotations

import datetime
import json
import logging
import time
from typing import Any, cast

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from .crd import GROUP, KIND, PLURAL, VERSION
from .stage_crd import PLURAL as STAGE_PLURAL

FIELD_MANAGER = "epd-operator"
DISCOVERY_SECONDS = 10.0
log = logging.getLogger(__name__)


def api_message(exc: Exception) -> str:
    """The apiserver's own words for a failed call (its Status message), else the exception."""
    body = getattr(exc, "body", None)
    if body:
        try:
            return json.loads(body).get("message") or str(body)
        except (ValueError, AttributeError):
            return str(body)
    return str(exc)


class Cluster:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.dynamic = DynamicClient(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._discovery: dict[str, tuple[float, set[str]]] = {}  # group-version -> (read at, kinds)

    def _resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def serves(self, api_version: str, kind: str) -> bool:
        """Whether the apiserver serves the kind now (e.g. cert-manager's CRDs are installed): its
        group-version's discovery document, re-read at most every DISCOVERY_SECONDS."""
        fetched, kinds = self._discovery.get(api_version, (float("-inf"), set()))
        if time.monotonic() - fetched > DISCOVERY_SECONDS:
            path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
            try:
                answer = self.dynamic.request("GET", path).to_dict()
                kinds = {r["kind"] for r in answer.get("resources", []) if "/" not in r["name"]}
            except NotFoundError:
                kinds = set()
            self._discovery[api_version] = (time.monotonic(), kinds)
        return kind in kinds

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply (force): re-running it is harmless, and drift in our fields is reverted."""
        meta = obj["metadata"]
        result = self.dynamic.server_side_apply(self._resource(obj["apiVersion"], obj["kind"]), body=obj,
                                                name=meta["name"], namespace=meta.get("namespace"),
                                                field_manager=FIELD_MANAGER, force_conflicts=True)
        return cast(dict[str, Any], result.to_dict())

    def create(self, obj: dict[str, Any]) -> bool:
        """Create unless it exists (True: created). Used for what must never be overwritten."""
        meta = obj["metadata"]
        try:
            self.dynamic.create(self._resource(obj["apiVersion"], obj["kind"]), body=obj,
                                namespace=meta.get("namespace"), field_manager=FIELD_MANAGER)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def secret_exists(self, name: str, namespace: str) -> bool:
        """Whether a Secret exists, learned from a dry-run create (409 = it does), which needs no
        right to read Secrets and reveals nothing but existence. Unknown answers count as present:
        the pods then report a missing Secret themselves."""
        body = client.V1Secret(metadata=client.V1ObjectMeta(name=name))
        try:
            self.core.create_namespaced_secret(namespace, body, dry_run="All")
            return False
        except ApiException as exc:
            if exc.status != 409:
                log.warning("cannot check Secret %s/%s: %s", namespace, name, api_message(exc))
            return True


    def list_objects(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        try:
            found = self.dynamic.get(self._resource(api_version, kind), namespace=namespace,
                                     label_selector=label_selector)
        except NotFoundError:  # the kind went away (its CRD was deleted): nothing of it exists
            self._discovery.pop(api_version, None)
            return []
        return [item.to_dict() for item in found.items]

    def delete(self, api_version: str, kind: str, name: str, namespace: str, uid: str) -> None:
        """Delete exactly the object seen (uid precondition); already gone is fine."""
        try:
            self.dynamic.delete(self._resource(api_version, kind), name=name, namespace=namespace,
                                body={"preconditions": {"uid": uid}, "propagationPolicy": "Background"})
        except NotFoundError:
            pass

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        labels = ",".join(f"{k}={v}" for k, v in selector.items())
        pods = self.core.list_namespaced_pod(namespace, label_selector=labels)
        return [self.api_client.sanitize_for_serialization(pod) for pod in pods.items]

    def patch_status(self, name: str, namespace: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})

    def patch_stage_status(self, name: str, namespace: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, STAGE_PLURAL, name,
                                                          {"status": status})

    def scale_stage(self, name: str, namespace: str, replicas: int) -> None:
        """Through the EPDStage's /scale subresource, as kubectl scale and an HPA do."""
        self.custom.patch_namespaced_custom_object_scale(GROUP, VERSION, namespace, STAGE_PLURAL, name,
                                                         {"spec": {"replicas": replicas}})

    def get_deployment(self, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def post_event(self, involved: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A Normal or Warning Event on the object (failures to post are only logged)."""
        meta = involved["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(api_version=involved.get("apiVersion", f"{GROUP}/{VERSION}"),
                                                      kind=involved.get("kind", KIND), name=meta["name"],
                                                      namespace=meta["namespace"], uid=meta.get("uid")),
            type=kind, reason=reason, message=message[:1024], first_timestamp=now, last_timestamp=now, count=1,
            source=client.V1EventSource(component=FIELD_MANAGER), reporting_component=FIELD_MANAGER,
            reporting_instance=FIELD_MANAGER)
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
        except ApiException as exc:
            log.warning("cannot post event %s on %s: %s", reason, meta["name"], api_message(exc))
