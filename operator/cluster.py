"""The operator's only door to the cluster: server-side apply with one field
manager, reads, and status patches. Synchronous (kubernetes client); kopf
handlers call it from their thread pool."""

from __future__ import annotations

from kubernetes import client
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from .crd import GROUP, PLURAL, VERSION

FIELD_MANAGER = "epd-operator"


class Cluster:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.dynamic = DynamicClient(api_client)

    def _resource(self, api_version: str, kind: str):
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def apply(self, obj: dict) -> dict:
        """Server-side apply (force): re-running it is harmless, and drift in our fields is reverted."""
        meta = obj["metadata"]
        result = self.dynamic.server_side_apply(self._resource(obj["apiVersion"], obj["kind"]), body=obj,
                                                name=meta["name"], namespace=meta.get("namespace"),
                                                field_manager=FIELD_MANAGER, force_conflicts=True)
        return result.to_dict()

    def get(self, api_version: str, kind: str, name: str, namespace: str) -> dict | None:
        try:
            return self.dynamic.get(self._resource(api_version, kind), name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict]:
        labels = ",".join(f"{k}={v}" for k, v in selector.items())
        pods = client.CoreV1Api(self.api_client).list_namespaced_pod(namespace, label_selector=labels)
        return [self.api_client.sanitize_for_serialization(pod) for pod in pods.items]

    def patch_status(self, name: str, namespace: str, status: dict) -> None:
        client.CustomObjectsApi(self.api_client).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status})

    def get_deployment(self, name: str, namespace: str) -> dict | None:
        return self.get(f"{GROUP}/{VERSION}", "EPDDeployment", name, namespace)
