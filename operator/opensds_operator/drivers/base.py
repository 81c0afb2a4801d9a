"""The one small interface every backend driver implements.

Every call is idempotent and keyed by names derived from CR UIDs (vol-<uid>, snap-<uid>):
creating what already exists returns it, deleting what is gone succeeds. That is what
makes a dock safe to kill at any point and re-run.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..api import CTX_PATH as PATH_KEY
from ..api import CTX_TRANSPORT as TRANSPORT_KEY
from ..scheduler import Capabilities


class DriverError(Exception):
    """A backend failure that may pass on retry (I/O error, busy device, lost connection)."""


class PermanentDriverError(DriverError):
    """A failure that needs a human: bad parameters, unsupported operation, impossible request."""


class NotFound(PermanentDriverError):
    """The named source volume or snapshot does not exist on the backend."""


@dataclass(frozen=True)
class PoolStats:
    name: str
    total_bytes: int
    free_bytes: int
    provisioned_bytes: int
    capabilities: Capabilities


@dataclass(frozen=True)
class VolumeInfo:
    backend_id: str
    size_bytes: int
    allocated_bytes: int
    path: str = ""  # local device or file when the backend is node-local


@dataclass(frozen=True)
class SnapshotInfo:
    backend_id: str
    size_bytes: int
    created_at: str  # RFC 3339


@dataclass(frozen=True)
class Owner:
    """Who a backend object belongs to, written onto the object itself when it is made.

    The orphan sweep only ever touches objects tagged with this cluster's and this backend's
    identity (two clusters sharing a pool never collect each other's), and a Retain deletion
    marks the object itself (`retained`), so the record survives the StorageBackend CR.
    `cluster` is the UID of the cluster's kube-system namespace.
    """

    cluster: str
    backend: str
    kind: str  # "Volume" or "Snapshot"
    namespace: str
    name: str
    uid: str
    retained: bool = False

    def to_dict(self) -> dict[str, str]:
        return {"cluster": self.cluster, "backend": self.backend, "kind": self.kind, "namespace": self.namespace,
                "name": self.name, "uid": self.uid, "retained": "true" if self.retained else "false"}

    def to_json(self) -> str:
        """The tag as stored on objects (xattr, sidecar file, RBD metadata, omap value)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, backend_id: str, raw: str | bytes | None) -> Owner | None:
        """The owner in a stored tag, or None when there is none, it is damaged, or it names another
        object's UID than `backend_id`'s own (a clone or a `cp -a` copy carries its original's)."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            return None
        owner = cls.from_dict(data)
        if owner is None or not owner.uid or not backend_id.endswith(owner.uid):
            return None
        return owner

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Owner | None:
        """None when the mapping is not a complete owner tag (an untagged or foreign object)."""
        try:
            return cls(data["cluster"], data["backend"], data["kind"], data["namespace"], data["name"],
                       data["uid"], data.get("retained") == "true")
        except KeyError:
            return None


@dataclass(frozen=True)
class BackendObject:
    """One volume or snapshot found on the backend, with its owner tag (None: untagged)."""

    backend_id: str  # vol-<uid> / snap-<uid>
    owner: Owner | None
    quarantined_at: float | None = None  # epoch seconds when the sweep quarantined it; None: live


@dataclass(frozen=True)
class Source:
    kind: str  # "Snapshot" or "Volume"
    backend_id: str


def local_export(driver: Driver, backend_id: str, pool: str) -> dict[str, str]:
    """Export of a node-local driver: the node opens the backend's file or device directly."""
    info = driver.get_volume(backend_id, pool)
    if info is None or not info.path:
        raise NotFound(f"volume {backend_id} not found in pool {pool}")
    return {TRANSPORT_KEY: "local", PATH_KEY: info.path}


class Driver(Protocol):
    name: str
    native_protocol: str  # what `export` serves: "local" (node opens the device) or e.g. "rbd"

    def pools(self) -> list[PoolStats]: ...

    def create_volume(
        self, backend_id: str, pool: str, size_bytes: int, thin: bool, source: Source | None = None,
        owner: Owner | None = None,
    ) -> VolumeInfo:
        """Make the volume tagged with `owner` (atomically where the backend allows: the tag is
        on the object before it carries its final name). The dock always passes an owner."""
        ...

    def delete_volume(self, backend_id: str, pool: str) -> None: ...

    def extend_volume(self, backend_id: str, pool: str, size_bytes: int) -> VolumeInfo: ...

    def get_volume(self, backend_id: str, pool: str) -> VolumeInfo | None: ...

    def create_snapshot(self, backend_id: str, pool: str, volume_id: str,
                        owner: Owner | None = None) -> SnapshotInfo: ...

    def delete_snapshot(self, backend_id: str, pool: str) -> None: ...

    def export(self, backend_id: str, pool: str, hosts: Sequence[str]) -> dict[str, str]:
        """Make the volume reachable by exactly these nodes (none: by nobody).

        Returns the publish_context a node needs to connect: "transport" names the node's
        connector, the other keys are transport-specific.
        """
        ...

    def list_objects(self, pool: str) -> list[str]:
        """Backend ids of every live (not quarantined) volume and snapshot in the pool (leak checks)."""
        ...

    def scan(self, pool: str) -> list[BackendObject]:
        """Every vol-/snap- object in the pool, live or quarantined, with its owner tag (for the sweep)."""
        ...

    def set_owner(self, backend_id: str, pool: str, owner: Owner) -> None:
        """Rewrite the object's owner tag (a Retain deletion records `retained=True` here)."""
        ...

    def quarantine(self, backend_id: str, pool: str) -> None:
        """Move an object the sweep found unowned out of the way, recoverable, noting when (idempotent)."""
        ...

    def purge(self, backend_id: str, pool: str) -> None:
        """Delete a quarantined object for good (idempotent)."""
        ...


@runtime_checkable
class SupportsQos(Protocol):
    """A driver whose backend enforces I/O limits itself (RBD image QoS for librbd clients)."""

    def set_qos(self, backend_id: str, max_iops: int | None, max_bps: int | None) -> None: ...
