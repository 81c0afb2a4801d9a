"""The one small interface every backend driver implements.

Every call is idempotent and keyed by names derived from CR UIDs (vol-<uid>, snap-<uid>):
creating what already exists returns it, deleting what is gone succeeds. That is what
makes a dock safe to kill at any point and re-run.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
class Source:
    kind: str  # "Snapshot" or "Volume"
    backend_id: str


# publish_context keys the CSI node reads (the connector is chosen by "transport").
TRANSPORT_KEY = "transport"
PATH_KEY = "path"


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
        self, backend_id: str, pool: str, size_bytes: int, thin: bool, source: Source | None = None
    ) -> VolumeInfo: ...

    def delete_volume(self, backend_id: str, pool: str) -> None: ...

    def extend_volume(self, backend_id: str, pool: str, size_bytes: int) -> VolumeInfo: ...

    def get_volume(self, backend_id: str, pool: str) -> VolumeInfo | None: ...

    def create_snapshot(self, backend_id: str, pool: str, volume_id: str) -> SnapshotInfo: ...

    def delete_snapshot(self, backend_id: str, pool: str) -> None: ...

    def export(self, backend_id: str, pool: str, hosts: Sequence[str]) -> dict[str, str]:
        """Make the volume reachable by exactly these nodes (none: by nobody).

        Returns the publish_context a node needs to connect: "transport" names the node's
        connector, the other keys are transport-specific.
        """
        ...

    def list_objects(self, pool: str) -> list[str]:
        """Backend ids of every volume and snapshot in the pool (for leak checks and GC)."""
        ...


@runtime_checkable
class SupportsQos(Protocol):
    """A driver whose backend enforces I/O limits itself (RBD image QoS for librbd clients)."""

    def set_qos(self, backend_id: str, max_iops: int | None, max_bps: int | None) -> None: ...
