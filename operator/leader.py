"""Lease-based leader election, so several operator replicas never reconcile
at the same time: only the holder of the Lease runs kopf; a holder that cannot
renew steps down (the process exits and Kubernetes restarts it); a holder that
shuts down releases the Lease, so a standby (which looks every `retry_seconds`)
takes over at once instead of waiting for it to expire."""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class LeaderElection:
    api: client.CoordinationV1Api
    name: str
    namespace: str
    identity: str
    lease_seconds: int = 15
    retry_seconds: float = 1.0
    beat: Callable[[], None] = lambda: None  # liveness of the waiting and renewing loops

    def try_acquire(self) -> bool:
        """One attempt: take or renew the Lease if it is free, expired, or already ours."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                                  spec=self._spec(acquire=True))
            try:
                self.api.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
        spec = lease.spec or client.V1LeaseSpec()
        mine = spec.holder_identity == self.identity
        renewed = spec.renew_time or spec.acquire_time
        expired = renewed is None or renewed + datetime.timedelta(seconds=spec.lease_duration_seconds or 0) < _now()
        if not (mine or expired or not spec.holder_identity):
            return False
        lease.spec = self._spec(acquire=not mine, previous=spec)
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)  # resourceVersion guards races
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def _spec(self, acquire: bool, previous: client.V1LeaseSpec | None = None) -> client.V1LeaseSpec:
        now = _now()
        previous = previous or client.V1LeaseSpec()
        transitions = (previous.lease_transitions or 0) + (1 if acquire else 0)
        return client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_seconds,
                                  acquire_time=now if acquire else previous.acquire_time, renew_time=now,
                                  lease_transitions=transitions)

    def wait_for_leadership(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            self.beat()
            try:
                if self.try_acquire():
                    log.info("acquired lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return True
            except (ApiException, OSError) as exc:
                log.warning("lease %s/%s not readable: %s", self.namespace, self.name, exc)
            stop.wait(self.retry_seconds)
        return False

    def release(self) -> None:
        """Hand the Lease back (empty holder) if it is still ours, so a standby need not wait for it
        to expire. Best effort: on failure the Lease simply expires."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = _now()
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("released lease %s/%s", self.namespace, self.name)
        except (ApiException, OSError) as exc:
            log.warning("lease %s/%s not released: %s", self.namespace, self.name, exc)

    def keep_renewing(self, lost: threading.Event, stop: threading.Event) -> None:
        """Renew until `stop`; set `lost` if the lease could not be renewed in time."""
        last = time.monotonic()
        while not stop.wait(self.lease_seconds / 3):
            self.beat()
            try:
                if self.try_acquire():
                    last = time.monotonic()
                    continue
            except (ApiException, OSError) as exc:
                log.warning("lease renewal failed: %s", exc)
            if time.monotonic() - last > self.lease_seconds:
                log.error("lost lease %s/%s; stepping down", self.namespace, self.name)
                lost.set()
                return
