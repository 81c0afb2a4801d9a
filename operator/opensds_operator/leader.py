"""One writer per backend: a local flock plus a coordination.k8s.io Lease (DESIGN invariant 1).

Two docks on one backend (a DaemonSet roll, a mistaken second deployment) would race on the
same files and LVs. The flock stops two processes on one node at once; the Lease stops two
anywhere in the cluster. A dock serves only while it holds both, and exits (to be restarted)
the moment it cannot renew the Lease, before another holder could be granted it.

Takeover without waiting out the Lease is allowed in one case only: the holder ran on this
same host and this process now holds the host's flock, so the holder is provably dead.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


class LockHeld(Exception):
    """Another process holds the backend's local lock."""


class BackendLock:
    """An exclusive, non-blocking flock on a file; released by the kernel when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        f = open(self.path, "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise LockHeld(f"{self.path} is locked by {holder or 'another process'}") from None
        f.truncate(0)
        f.write(f"{identity()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def identity() -> str:
    """host/pid: unique among live processes, and names the host for the same-host takeover rule."""
    return f"{socket.gethostname()}/{os.getpid()}"


def _rfc3339(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


class BackendLease:
    """A Lease named after the backend; acquire() blocks until held, a thread renews it."""

    def __init__(self, api: client.ApiClient, backend: str, namespace: str, duration_seconds: int = 15,
                 renew_seconds: float = 5.0) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.name = f"opensds-dock-{backend}"
        self.namespace = namespace
        self.duration = duration_seconds
        self.renew_seconds = renew_seconds
        self.holder = identity()
        self.lost = threading.Event()
        self._stop = threading.Event()

    def _spec(self, acquired: bool) -> client.V1LeaseSpec:
        stamp = _rfc3339(time.time())
        spec = client.V1LeaseSpec(holder_identity=self.holder, lease_duration_seconds=self.duration,
                                  renew_time=stamp)
        if acquired:
            spec.acquire_time = stamp
        return spec

    def _expired(self, lease: client.V1Lease) -> bool:
        spec = lease.spec
        if not spec.holder_identity or spec.renew_time is None:
            return True
        same_host = spec.holder_identity.split("/")[0] == self.holder.split("/")[0]
        if same_host:
            return True  # we hold this host's flock: that holder is dead
        age = time.time() - spec.renew_time.timestamp()
        return bool(age > (spec.lease_duration_seconds or self.duration))

    def try_acquire(self) -> bool:
        """One attempt: create the Lease, renew our own, or take over an expired one (optimistic)."""
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name), spec=self._spec(True))
            try:
                self.coordination.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as e2:
                if e2.status == 409:
                    return False
                raise
        if lease.spec.holder_identity != self.holder and not self._expired(lease):
            return False
        lease.spec = self._spec(lease.spec.holder_identity != self.holder)
        try:
            # resourceVersion in the body makes this a compare-and-swap: a concurrent taker loses.
            self.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def acquire(self) -> None:
        waited = False
        while not self.try_acquire():
            if not waited:
                log.info("waiting for Lease %s/%s (held by another dock)", self.namespace, self.name)
                waited = True
            time.sleep(1.0)
        log.info("holding Lease %s/%s as %s", self.namespace, self.name, self.holder)
        threading.Thread(target=self._renew, name="lease-renewer", daemon=True).start()

    def _renew(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.renew_seconds):
            try:
                if self.try_acquire():
                    last_ok = time.monotonic()
                    continue
                log.error("Lease %s/%s was taken by another dock", self.namespace, self.name)
            except Exception as e:  # API unreachable: keep trying until the lease would lapse
                log.warning("renewing Lease %s/%s failed: %s", self.namespace, self.name, e)
                # Give up well before the Lease could lapse and be granted to someone else.
                if time.monotonic() - last_ok < self.duration / 2:
                    continue
            self.lost.set()
            return

    def release(self) -> None:
        """On a clean stop: hand the Lease over at once instead of letting it lapse."""
        self._stop.set()
        if self.lost.is_set():
            return
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.holder:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as e:
            log.warning("releasing Lease %s/%s failed: %s", self.namespace, self.name, e.reason)
