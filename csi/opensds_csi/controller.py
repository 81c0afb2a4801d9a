"""CSI Controller service: every call becomes a Volume/Snapshot CR write, then a wait on its status.

The operator schedules and the dock does the backend work; this service never touches a
backend itself. Because the desired state is in the API before anything happens, a
controller crash loses nothing: the CO retries the idempotent call and finds the CR.

IDs are `<namespace>/<cr-name>`: readable in `kubectl get pv -o yaml` and resolvable with
one GET. CR names are the CSI names when those are valid DNS labels (external-provisioner's
`pvc-<uid>`, `snapshot-<uid>`), else a hash of them; the CSI name is kept in an annotation.
"""
from __future__ import annotations

import bisect
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import Int64Value
from kubernetes.client.exceptions import ApiException

from opensds_operator.api import (
    AVAILABLE,
    BACKENDS,
    CODE_BACKEND_OBJECT_MISSING,
    CODE_BACKEND_UNAVAILABLE,
    CODE_CAPACITY_EXHAUSTED,
    CODE_CROSS_NAMESPACE_SOURCE,
    CODE_EXPORT_FAILED,
    CODE_INVALID_PARAMETERS,
    CODE_PLACEMENT_INVALID,
    CODE_PROFILE_NOT_FOUND,
    CODE_SOURCE_NOT_FOUND,
    CODE_UNSCHEDULABLE,
    ERROR,
    MAX_VOLUME_BYTES,
    PROFILES,
    READY,
    SCHEDULED,
    SNAPSHOTS,
    VC_ACCESS_PROTOCOL,
    VC_VOLUME_UID,
    VOLUMES,
    valid_node_name,
)
from opensds_operator.quantity import exact_quantity, parse_bytes
from opensds_operator.scheduler import (
    DEFAULT_FILTERS,
    Pool,
    Request,
    available_bytes,
    backend_ready,
    capacity,
    largest_volume_bytes,
    placement,
    pools_from_backend,
    request_for,
    source_locality,
)

from .errors import (
    Aborted,
    AlreadyExists,
    CsiError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unimplemented,
)
from .identity import DRIVER_NAME
from .kubeapi import ClusterApi, KubeClusterApi
from .locks import KeyLocks
from .proto import csi_pb2, csi_pb2_grpc
from .store import Obj, ObjectStore

CSI_NAME_ANNOTATION = "opensds.io/csi-name"
PVC_ANNOTATION = "opensds.io/pvc"
MANAGED_BY_CSI = {"app.kubernetes.io/managed-by": "opensds-csi"}
DEFAULT_SIZE = 1 << 30
MIB = 1 << 20
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

AccessMode = csi_pb2.VolumeCapability.AccessMode
SINGLE_NODE_MODES = frozenset({
    AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_READER_ONLY,
    AccessMode.SINGLE_NODE_SINGLE_WRITER, AccessMode.SINGLE_NODE_MULTI_WRITER,
})
MULTI_NODE_MODES = frozenset({
    AccessMode.MULTI_NODE_READER_ONLY, AccessMode.MULTI_NODE_SINGLE_WRITER, AccessMode.MULTI_NODE_MULTI_WRITER,
})

# Filters that decide whether a pool could hold a volume of a profile at all (GetCapacity):
# placement, source and current usage are per-volume questions, not capacity questions.
CAPACITY_FILTERS = tuple(f for f in DEFAULT_FILTERS if f not in (placement, source_locality, capacity))

Cap = csi_pb2.ControllerServiceCapability.RPC
CONTROLLER_CAPABILITIES = (
    Cap.CREATE_DELETE_VOLUME, Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.LIST_VOLUMES, Cap.GET_CAPACITY,
    Cap.CREATE_DELETE_SNAPSHOT, Cap.LIST_SNAPSHOTS, Cap.CLONE_VOLUME, Cap.EXPAND_VOLUME,
    Cap.LIST_VOLUMES_PUBLISHED_NODES, Cap.VOLUME_CONDITION, Cap.GET_VOLUME, Cap.SINGLE_NODE_MULTI_WRITER,
    Cap.GET_SNAPSHOT,
)


def cr_name(csi_name: str) -> str:
    if DNS_LABEL.fullmatch(csi_name):
        return csi_name
    return "csi-" + hashlib.sha256(csi_name.encode()).hexdigest()[:40]


def make_id(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def parse_id(object_id: str) -> tuple[str, str] | None:
    """(namespace, name), or None for an id we never issued (the object then does not exist)."""
    parts = object_id.split("/")
    if len(parts) != 2 or not all(DNS_LABEL.fullmatch(p) for p in parts):
        return None
    return parts[0], parts[1]


def requested_size(capacity_range: csi_pb2.CapacityRange | None, default: int = DEFAULT_SIZE) -> int:
    """The size to make: the required bytes rounded up to whole MiB unless that breaks the limit."""
    required = capacity_range.required_bytes if capacity_range else 0
    limit = capacity_range.limit_bytes if capacity_range else 0
    if required < 0 or limit < 0:
        raise OutOfRange("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
    size = required or (min(default, limit) if limit else default)
    rounded = -(-size // MIB) * MIB
    size = rounded if not limit or rounded <= limit else size
    if size > MAX_VOLUME_BYTES:
        raise OutOfRange(f"{size} bytes is more than the largest volume, {exact_quantity(MAX_VOLUME_BYTES)}")
    return size


def _condition(obj: Obj, kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c.get("type") == kind), None)


def _timestamp(rfc3339: str | None) -> Timestamp:
    ts = Timestamp()
    if rfc3339:
        ts.FromJsonString(rfc3339)
    return ts


# ------------------------------------------------------------ failure codes -> gRPC codes
# The one table: a stable code the operator/dock records on a CR (status.code, or the reason
# of a False Scheduled/Ready condition) -> the error the CSI caller gets. None: transient, so
# the call keeps waiting (and ends DEADLINE_EXCEEDED; the CO retries). Only capacity is
# RESOURCE_EXHAUSTED (the CO may then try another topology); a missing source is NOT_FOUND as
# the spec prescribes for CreateVolume; a backend object that existed and is gone needs a
# human (restore the disk/VG) before anything can succeed: FAILED_PRECONDITION, never a retry
# that would re-create it empty.
FAILURE_CODES: dict[str, type[CsiError] | None] = {
    CODE_SOURCE_NOT_FOUND: NotFound,
    CODE_PROFILE_NOT_FOUND: InvalidArgument,
    CODE_INVALID_PARAMETERS: InvalidArgument,
    CODE_CROSS_NAMESPACE_SOURCE: InvalidArgument,
    CODE_PLACEMENT_INVALID: InvalidArgument,
    CODE_UNSCHEDULABLE: ResourceExhausted,
    CODE_CAPACITY_EXHAUSTED: ResourceExhausted,
    CODE_BACKEND_OBJECT_MISSING: FailedPrecondition,
    CODE_EXPORT_FAILED: FailedPrecondition,
    CODE_BACKEND_UNAVAILABLE: None,
}


# Which recorded failures end the wait of a call on an existing volume (others: keep waiting).
PUBLISH_FAILURES = frozenset({CODE_EXPORT_FAILED, CODE_INVALID_PARAMETERS, CODE_BACKEND_OBJECT_MISSING})
UNPUBLISH_FAILURES = frozenset({CODE_EXPORT_FAILED, CODE_BACKEND_OBJECT_MISSING})
EXPAND_FAILURES = frozenset({CODE_CAPACITY_EXHAUSTED, CODE_INVALID_PARAMETERS, CODE_BACKEND_OBJECT_MISSING})


def recorded_failure(obj: Obj, relevant: frozenset[str] | None = None) -> CsiError | None:
    """The permanent failure a CR records for its current generation, as the CSI error to return.

    status.code wins; else the reason of a False Scheduled or Ready condition when it is a
    known code. A phase Error with no known code (a dock older or newer than this controller)
    is FAILED_PRECONDITION: a permanent failure that needs a human, of a kind we cannot name.
    Failures recorded for an older generation are stale and ignored. With `relevant`, only
    those codes end a wait (an unpublish does not fail on a full pool).
    """
    status = obj.get("status") or {}
    generation = int(obj["metadata"].get("generation") or 0)
    observed = int(status.get("observedGeneration") or generation)
    failed = [c for c in (_condition(obj, SCHEDULED), _condition(obj, READY))
              if c and c.get("status") == "False" and int(c.get("observedGeneration") or observed) >= generation]
    if observed < generation:
        status = {}
    code = status.get("code")
    if not code:
        code = next((c.get("reason") for c in failed if c.get("reason") in FAILURE_CODES), None)
    message = next((c.get("message") for c in failed if c.get("reason") == code and c.get("message")), None)
    message = (message or next((c.get("message") for c in failed if c.get("message")), None)
               or "the backend reported an error without a message")
    if relevant is not None:
        code = code if code in relevant else None
        if code is None:
            return None
    if code in FAILURE_CODES:
        kind = FAILURE_CODES[code]
        return kind(f"{code}: {message}") if kind else None
    if status.get("phase") == ERROR:
        return FailedPrecondition(f"{code or 'Error'}: {message}")
    return None


def _transient_note(obj: Obj | None) -> str:
    """What a CR says while it waits (a transient code), to explain a DEADLINE_EXCEEDED."""
    if obj is None:
        return ""
    failed = [c for c in (_condition(obj, SCHEDULED), _condition(obj, READY)) if c and c.get("status") == "False"]
    return "; last status: " + "; ".join(f"{c.get('reason')}: {c.get('message', '')}" for c in failed) if failed \
        else ""


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, store: ObjectStore, wait_timeout: float = 60.0, api: ClusterApi | None = None) -> None:
        self.store = store
        self.api: ClusterApi = api or KubeClusterApi()
        self.namespace = store.namespace
        self.wait_timeout = wait_timeout
        self.locks = KeyLocks()

    # ------------------------------------------------------------ helpers

    def _timeout(self, context: grpc.ServicerContext) -> float:
        """Wait at most until just before the caller gives up, so the answer still reaches it."""
        remaining = context.time_remaining()
        return self.wait_timeout if remaining is None else max(min(remaining - 0.5, self.wait_timeout), 0.1)

    def _volume(self, volume_id: str) -> Obj | None:
        parsed = parse_id(volume_id)
        if parsed is None:
            return None
        namespace, name = parsed
        if namespace == self.namespace:
            return self.store.get(VOLUMES, name) or self.api.get(VOLUMES, name, namespace)
        return self.api.get(VOLUMES, name, namespace)

    def _profile(self, name: str) -> Obj:
        profile = self.api.get(PROFILES, name)
        if profile is None:
            raise InvalidArgument(f"StorageProfile {name!r} (StorageClass parameter 'profile') does not exist")
        return profile

    def _pools(self) -> list[Pool]:
        return [pool for backend in self.api.list(BACKENDS) for pool in pools_from_backend(backend)]

    def _accessible_topology(self, volume: Obj, protocol: str) -> list[csi_pb2.Topology]:
        spec = volume["spec"]
        for pool in self._pools():
            if pool.key == (spec.get("backend"), spec.get("pool")):
                reach = pool.topology_for(protocol)
                return [csi_pb2.Topology(segments=reach)] if reach else []
        return []

    def _csi_volume(self, volume: Obj, protocol: str | None = None) -> csi_pb2.Volume:
        meta, spec, status = volume["metadata"], volume["spec"], volume.get("status") or {}
        source = spec.get("source")
        content = None
        if source:
            source_id = make_id(meta["namespace"], source["name"])
            content = (csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                snapshot_id=source_id)) if source["kind"] == "Snapshot" else csi_pb2.VolumeContentSource(
                volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source_id)))
        if protocol is None:
            protocol = self._profile(spec["profile"])["spec"].get("accessProtocol", "local")
        return csi_pb2.Volume(
            volume_id=make_id(meta["namespace"], meta["name"]),
            capacity_bytes=int(status.get("capacityBytes") or parse_bytes(spec["size"])),
            volume_context={"profile": spec["profile"], "backend": spec.get("backend", ""),
                            "pool": spec.get("pool", ""), VC_ACCESS_PROTOCOL: protocol,
                            VC_VOLUME_UID: meta["uid"]},
            content_source=content,
            accessible_topology=self._accessible_topology(volume, protocol),
        )

    @staticmethod
    def _check_capabilities(capabilities: Sequence[csi_pb2.VolumeCapability], profile_spec: dict[str, Any]) -> None:
        if not capabilities:
            raise InvalidArgument("volume_capabilities must not be empty")
        multi_attach = bool((profile_spec.get("provisioning") or {}).get("multiAttach"))
        for cap in capabilities:
            if not cap.HasField("block") and not cap.HasField("mount"):
                raise InvalidArgument("each volume capability needs access_type block or mount")
            if cap.access_mode.mode not in SINGLE_NODE_MODES | MULTI_NODE_MODES:
                raise InvalidArgument("each volume capability needs an access_mode")
            if cap.access_mode.mode in MULTI_NODE_MODES and not multi_attach:
                raise InvalidArgument(f"access mode {AccessMode.Mode.Name(cap.access_mode.mode)} needs a profile "
                                      f"with provisioning.multiAttach")
            if cap.HasField("mount") and profile_spec.get("storageType") == "file":
                continue
            if cap.HasField("mount") and cap.mount.fs_type not in ("", "ext4", "xfs"):
                raise InvalidArgument(f"fs_type {cap.mount.fs_type!r} is not supported (ext4, xfs)")

    def _source(self, source: csi_pb2.VolumeContentSource, size: int) -> dict[str, str] | None:
        if source.HasField("snapshot"):
            kind, plural, source_id = "Snapshot", SNAPSHOTS, source.snapshot.snapshot_id
        elif source.HasField("volume"):
            kind, plural, source_id = "Volume", VOLUMES, source.volume.volume_id
        else:
            return None
        parsed = parse_id(source_id)
        obj = self.api.get(plural, parsed[1], parsed[0]) if parsed and parsed[0] == self.namespace else None
        if obj is None:
            raise NotFound(f"source {kind.lower()} {source_id} does not exist")
        source_size = ((obj.get("status") or {}).get("sizeBytes") if plural == SNAPSHOTS
                       else parse_bytes(obj["spec"]["size"])) or 0
        if size < int(source_size):
            raise OutOfRange(f"requested {size} bytes is smaller than the source {kind.lower()} ({source_size} bytes)")
        return {"kind": kind, "name": obj["metadata"]["name"]}

    # ------------------------------------------------------------ volumes

    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.CreateVolumeResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        params = dict(request.parameters)
        profile_name = params.get("profile")
        if not profile_name:
            raise InvalidArgument("StorageClass parameter 'profile' is required (the StorageProfile to use)")
        profile_spec = dict(self._profile(profile_name).get("spec") or {})
        self._check_capabilities(request.volume_capabilities, profile_spec)
        size = requested_size(request.capacity_range if request.HasField("capacity_range") else None)
        name = cr_name(request.name)
        with self.locks.hold(make_id(self.namespace, name)):
            source = self._source(request.volume_content_source, size) if request.HasField(
                "volume_content_source") else None
            volume = self.store.get(VOLUMES, name) or self.api.get(VOLUMES, name, self.namespace)
            if volume is not None:
                self._check_same_volume(volume, request.name, size, profile_name, source)
            else:
                volume = self._create_volume_cr(request, name, size, profile_name, source)
            volume = self._wait_available(volume, context)
        protocol = profile_spec.get("accessProtocol", "local")
        return csi_pb2.CreateVolumeResponse(volume=self._csi_volume(volume, protocol))

    def _check_same_volume(self, volume: Obj, csi_name: str, size: int, profile: str,
                           source: dict[str, str] | None) -> None:
        meta, spec = volume["metadata"], volume["spec"]
        theirs = (meta.get("annotations") or {}).get(CSI_NAME_ANNOTATION)
        if theirs != csi_name:
            raise AlreadyExists(f"Volume {meta['name']} exists and was not made for CSI name {csi_name!r}")
        if meta.get("deletionTimestamp"):
            raise AlreadyExists(f"volume {csi_name} is being deleted; retry once it is gone")
        differs = []
        if parse_bytes(spec["size"]) != size:
            differs.append(f"size {spec['size']} (asked {size})")
        if spec["profile"] != profile:
            differs.append(f"profile {spec['profile']} (asked {profile})")
        if (spec.get("source") or None) != source:
            differs.append("content source")
        if differs:
            raise AlreadyExists(f"volume {csi_name} already exists with another " + ", ".join(differs))

    def _create_volume_cr(self, request: csi_pb2.CreateVolumeRequest, name: str, size: int, profile: str,
                          source: dict[str, str] | None) -> Obj:
        params = dict(request.parameters)
        annotations = {CSI_NAME_ANNOTATION: request.name}
        pvc_ns, pvc_name = params.get("csi.storage.k8s.io/pvc/namespace"), params.get("csi.storage.k8s.io/pvc/name")
        if pvc_ns and pvc_name:
            annotations[PVC_ANNOTATION] = f"{pvc_ns}/{pvc_name}"
        spec: dict[str, Any] = {"size": exact_quantity(size), "profile": profile, "reclaimPolicy": "Delete"}
        if source:
            spec["source"] = source
        access = request.accessibility_requirements
        if access.requisite or access.preferred:
            spec["accessibilityRequirements"] = {
                "requisite": [dict(t.segments) for t in access.requisite],
                "preferred": [dict(t.segments) for t in access.preferred],
            }
        body = {"apiVersion": "opensds.io/v1alpha1", "kind": "Volume",
                "metadata": {"name": name, "annotations": annotations, "labels": MANAGED_BY_CSI},
                "spec": spec}
        try:
            created = self.api.create(VOLUMES, body, self.namespace)
        except ApiException as e:
            if e.status == 409:  # made meanwhile by another controller replica: the next retry compares it
                raise Aborted(f"volume {request.name} is being created concurrently; retry") from e
            raise
        self.store.put(VOLUMES, created)
        return created

    def _wait_available(self, volume: Obj, context: grpc.ServicerContext) -> Obj:
        name, uid = volume["metadata"]["name"], volume["metadata"]["uid"]
        failure: list[CsiError] = []

        def done(obj: Obj | None) -> bool:
            if obj is None or obj["metadata"]["uid"] != uid:
                failure.append(NotFound(f"volume {name} was deleted while being created"))
                return True
            if (obj.get("status") or {}).get("phase") == AVAILABLE:
                return True
            error = recorded_failure(obj)
            if error is not None:
                failure.append(error)
                return True
            return False

        result = self._wait(VOLUMES, name, done, context, f"volume {name} to be Available")
        if failure:
            error = failure[0]
            current = self.store.get(VOLUMES, name)
            if current is not None and self._nothing_made(current):
                # A final error must leave nothing behind: the CO may retry elsewhere (another node
                # for WaitForFirstConsumer) with the same name, and must not find this attempt.
                self.api.delete(VOLUMES, name, self.namespace)
            raise error
        assert result is not None
        return result

    @staticmethod
    def _nothing_made(obj: Obj) -> bool:
        """True when no backend object can exist for this CR: it is safe to delete on a final error.

        A CR whose backend object was made once (an ID in status, or BackendObjectMissing) is
        kept: deleting it would let a later orphan sweep remove data that may come back (a disk
        not mounted yet), and a human must decide."""
        status = obj.get("status") or {}
        return not (status.get("backendVolumeID") or status.get("backendSnapshotID")
                    or status.get("code") == CODE_BACKEND_OBJECT_MISSING
                    or any(c.get("reason") == CODE_BACKEND_OBJECT_MISSING for c in status.get("conditions") or []))

    def _wait(self, plural: str, name: str, done: Callable[[Obj | None], bool], context: grpc.ServicerContext,
              what: str) -> Obj | None:
        """store.wait_for bounded by the caller's deadline; a timeout says what the CR last reported."""
        try:
            return self.store.wait_for(plural, name, done, self._timeout(context), what)
        except DeadlineExceeded as e:
            raise DeadlineExceeded(e.message + _transient_note(self.store.get(plural, name))) from None

    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        parsed = parse_id(request.volume_id)
        if parsed is None:
            return csi_pb2.DeleteVolumeResponse()
        namespace, name = parsed
        with self.locks.hold(request.volume_id):
            volume = self._volume(request.volume_id)
            if volume is None:
                return csi_pb2.DeleteVolumeResponse()
            if volume["spec"].get("publishedNodes"):
                raise FailedPrecondition(f"volume {request.volume_id} is still published to "
                                         f"{', '.join(volume['spec']['publishedNodes'])}; unpublish it first")
            uid = volume["metadata"]["uid"]
            self.api.delete(VOLUMES, name, namespace)
            if namespace == self.namespace:
                self.store.wait_for(VOLUMES, name, lambda o: o is None or o["metadata"]["uid"] != uid,
                                    self._timeout(context), f"volume {name} to be deleted")
        return csi_pb2.DeleteVolumeResponse()

    def ControllerPublishVolume(self, request: csi_pb2.ControllerPublishVolumeRequest,
                                context: grpc.ServicerContext) -> csi_pb2.ControllerPublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.node_id:
            raise InvalidArgument("node_id is required")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        with self.locks.hold(request.volume_id):
            volume = self._volume(request.volume_id)
            if volume is None:
                raise NotFound(f"volume {request.volume_id} does not exist")
            profile_spec = dict(self._profile(volume["spec"]["profile"]).get("spec") or {})
            self._check_capabilities([request.volume_capability], profile_spec)
            if not self._node_registered(request.node_id):
                raise NotFound(f"node {request.node_id} has no CSINode entry for {DRIVER_NAME}")
            self._check_reachable(volume, request.node_id, profile_spec)
            nodes = list(volume["spec"].get("publishedNodes") or [])
            if request.node_id not in nodes:
                multi = bool((profile_spec.get("provisioning") or {}).get("multiAttach"))
                if nodes and not multi:
                    raise FailedPrecondition(f"volume {request.volume_id} is published to {nodes[0]} and its "
                                             f"profile does not allow multi-attach")
                volume = self._set_published_nodes(volume, [*nodes, request.node_id])
            published = self._wait_exported(volume, lambda s: request.node_id in (s.get("publishedNodes") or [])
                                            and bool(s.get("publishContext")), context, PUBLISH_FAILURES)
        return csi_pb2.ControllerPublishVolumeResponse(
            publish_context=dict((published.get("status") or {}).get("publishContext") or {}))

    def _node_registered(self, node_id: str) -> bool:
        """A node exists for us when its CSINode lists our driver (what node-driver-registrar writes).

        A node id that cannot be a node name (it would become part of NQNs, IQNs and configfs
        paths on the dock) names no node at all."""
        if not valid_node_name(node_id):
            return False
        drivers = self.api.csi_node_ids(node_id)
        return drivers is not None and drivers.get(DRIVER_NAME) == node_id

    def _check_reachable(self, volume: Obj, node_id: str, profile_spec: dict[str, Any]) -> None:
        protocol = profile_spec.get("accessProtocol", "local")
        for segment in self._accessible_topology(volume, protocol):
            node = segment.segments.get("topology.block.csi.opensds.io/node")
            if node and node != node_id:
                raise FailedPrecondition(f"volume {volume['metadata']['name']} lives on node {node} "
                                         f"(accessProtocol {protocol}); node {node_id} cannot reach it")

    def _set_published_nodes(self, volume: Obj, nodes: list[str]) -> Obj:
        """Write the node list with the object's resourceVersion, so concurrent writers cannot lose an entry."""
        meta = volume["metadata"]
        body = {"metadata": {"resourceVersion": meta["resourceVersion"]},
                "spec": {"publishedNodes": sorted(set(nodes))}}
        try:
            updated = self.api.patch(VOLUMES, meta["name"], body, meta["namespace"])
        except ApiException as e:
            if e.status == 409:
                fresh = self.api.get(VOLUMES, meta["name"], meta["namespace"])
                if fresh is None:
                    raise NotFound(f"volume {meta['name']} was deleted") from e
                return self._set_published_nodes(fresh, nodes)
            raise
        if meta["namespace"] == self.namespace:
            self.store.put(VOLUMES, updated)
        return updated

    def _wait_exported(self, volume: Obj, exported: Callable[[dict[str, Any]], bool],
                       context: grpc.ServicerContext, fails_on: frozenset[str]) -> Obj:
        meta = volume["metadata"]
        if meta["namespace"] != self.namespace:
            raise FailedPrecondition(f"volume {meta['name']} is outside the controller's namespace {self.namespace}")

        generation = int(volume["metadata"].get("generation") or 0)

        def done(obj: Obj | None) -> bool:
            if obj is None:
                raise NotFound(f"volume {meta['name']} was deleted")
            if exported(obj.get("status") or {}):
                return True
            if int(obj["metadata"].get("generation") or 0) >= generation:
                error = recorded_failure(obj, fails_on)
                if error is not None:
                    raise error
            return False

        result = self._wait(VOLUMES, meta["name"], done, context, f"the dock to update the export of {meta['name']}")
        assert result is not None
        return result

    def ControllerUnpublishVolume(self, request: csi_pb2.ControllerUnpublishVolumeRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.ControllerUnpublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        with self.locks.hold(request.volume_id):
            volume = self._volume(request.volume_id)
            if volume is None:
                return csi_pb2.ControllerUnpublishVolumeResponse()
            nodes = list(volume["spec"].get("publishedNodes") or [])
            remaining = [n for n in nodes if request.node_id and n != request.node_id]
            if remaining != nodes:
                volume = self._set_published_nodes(volume, remaining)
            gone = set(nodes) - set(remaining)
            self._wait_exported(volume, lambda s: not gone & set(s.get("publishedNodes") or []), context,
                                UNPUBLISH_FAILURES)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities must not be empty")
        volume = self._volume(request.volume_id)
        if volume is None:
            raise NotFound(f"volume {request.volume_id} does not exist")
        profile_spec = dict(self._profile(volume["spec"]["profile"]).get("spec") or {})
        try:
            self._check_capabilities(request.volume_capabilities, profile_spec)
        except InvalidArgument as e:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=e.message)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
                parameters=request.parameters))

    def ListVolumes(self, request: csi_pb2.ListVolumesRequest,
                    context: grpc.ServicerContext) -> csi_pb2.ListVolumesResponse:
        volumes = self.store.items(VOLUMES)
        page, next_token = _paginate(volumes, request.starting_token, request.max_entries)
        protocols: dict[str, str] = {}
        entries = []
        for volume in page:
            profile = volume["spec"]["profile"]
            if profile not in protocols:
                found = self.api.get(PROFILES, profile) or {}
                protocols[profile] = (found.get("spec") or {}).get("accessProtocol", "local")
            entries.append(csi_pb2.ListVolumesResponse.Entry(
                volume=self._csi_volume(volume, protocols[profile]), status=self._volume_status(volume)))
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    @staticmethod
    def _volume_status(volume: Obj) -> csi_pb2.ListVolumesResponse.VolumeStatus:
        status = volume.get("status") or {}
        ready = _condition(volume, "Ready") or {}
        abnormal = status.get("phase") == ERROR or ready.get("status") == "False"
        return csi_pb2.ListVolumesResponse.VolumeStatus(
            published_node_ids=list(status.get("publishedNodes") or []),
            volume_condition=csi_pb2.VolumeCondition(
                abnormal=abnormal, message=ready.get("message", "") if abnormal else "volume is healthy"))

    def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                            context: grpc.ServicerContext) -> csi_pb2.ControllerGetVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        volume = self._volume(request.volume_id)
        if volume is None:
            raise NotFound(f"volume {request.volume_id} does not exist")
        listed = self._volume_status(volume)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._csi_volume(volume),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=listed.published_node_ids, volume_condition=listed.volume_condition))

    def GetCapacity(self, request: csi_pb2.GetCapacityRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetCapacityResponse:
        profile_name = dict(request.parameters).get("profile")
        profile_spec = dict(self._profile(profile_name).get("spec") or {}) if profile_name else {}
        if request.volume_capabilities:
            self._check_capabilities(request.volume_capabilities, profile_spec)
        base = request_for({}, profile_spec, 0)
        segment = dict(request.accessible_topology.segments) if request.HasField("accessible_topology") else {}
        wanted = Request(size_bytes=0, storage_type=base.storage_type, protocol=base.protocol,
                         provisioning=base.provisioning, multi_attach=base.multi_attach,
                         custom_properties=base.custom_properties, allowed_topology=base.allowed_topology,
                         requisite_topology=[segment] if segment else [], at=time.time())
        filters = CAPACITY_FILTERS if profile_name else (backend_ready,)
        pools = [p for p in self._pools() if all(f(wanted, p, p.provisioned_bytes) is None for f in filters)
                 and (profile_name or not segment or all(p.topology_for("local").get(k) == v
                                                         for k, v in segment.items()))]
        total = sum(available_bytes(wanted, p) for p in pools)
        largest = max((largest_volume_bytes(wanted, p) for p in pools), default=0)
        return csi_pb2.GetCapacityResponse(
            available_capacity=total, maximum_volume_size=Int64Value(value=largest) if pools else None)

    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=Cap(type=c)) for c in CONTROLLER_CAPABILITIES])

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext) -> csi_pb2.ControllerExpandVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        size = requested_size(request.capacity_range)
        block = request.HasField("volume_capability") and request.volume_capability.HasField("block")
        with self.locks.hold(request.volume_id):
            volume = self._volume(request.volume_id)
            if volume is None:
                raise NotFound(f"volume {request.volume_id} does not exist")
            meta = volume["metadata"]
            if parse_bytes(volume["spec"]["size"]) < size:
                volume = self.api.patch(VOLUMES, meta["name"], {"spec": {"size": exact_quantity(size)}},
                                        meta["namespace"])
                if meta["namespace"] == self.namespace:
                    self.store.put(VOLUMES, volume)
            grown = self._wait_exported(volume, lambda s: s.get("phase") == AVAILABLE
                                        and int(s.get("capacityBytes") or 0) >= size, context, EXPAND_FAILURES)
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=int(grown["status"]["capacityBytes"]), node_expansion_required=not block)

    # ------------------------------------------------------------ snapshots

    def _csi_snapshot(self, snapshot: Obj) -> csi_pb2.Snapshot:
        meta, status = snapshot["metadata"], snapshot.get("status") or {}
        return csi_pb2.Snapshot(
            snapshot_id=make_id(meta["namespace"], meta["name"]),
            source_volume_id=make_id(meta["namespace"], snapshot["spec"]["volumeName"]),
            size_bytes=int(status.get("sizeBytes") or 0),
            creation_time=_timestamp(status.get("creationTime") or meta.get("creationTimestamp")),
            ready_to_use=bool(status.get("readyToUse")),
        )

    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.CreateSnapshotResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        if not request.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        name = cr_name(request.name)
        with self.locks.hold("snapshot:" + make_id(self.namespace, name)):
            snapshot = self.store.get(SNAPSHOTS, name) or self.api.get(SNAPSHOTS, name, self.namespace)
            source = parse_id(request.source_volume_id)
            if snapshot is not None:
                if (snapshot["metadata"].get("annotations") or {}).get(CSI_NAME_ANNOTATION) != request.name or (
                        source != (self.namespace, snapshot["spec"]["volumeName"])):
                    raise AlreadyExists(f"snapshot {request.name} already exists for another source volume")
            else:
                volume = self._volume(request.source_volume_id)
                if volume is None or source is None or source[0] != self.namespace:
                    raise NotFound(f"source volume {request.source_volume_id} does not exist")
                snapshot = self.api.create(SNAPSHOTS, {
                    "apiVersion": "opensds.io/v1alpha1", "kind": "Snapshot",
                    "metadata": {"name": name, "annotations": {CSI_NAME_ANNOTATION: request.name},
                                 "labels": MANAGED_BY_CSI},
                    "spec": {"volumeName": source[1]}}, self.namespace)
                self.store.put(SNAPSHOTS, snapshot)
            uid = snapshot["metadata"]["uid"]

            failure: list[CsiError] = []

            def done(obj: Obj | None) -> bool:
                if obj is None or obj["metadata"]["uid"] != uid:
                    raise NotFound(f"snapshot {name} was deleted while being created")
                if (obj.get("status") or {}).get("readyToUse"):
                    return True
                error = recorded_failure(obj)
                if error is not None:
                    failure.append(error)
                    return True
                return False

            ready = self._wait(SNAPSHOTS, name, done, context, f"snapshot {name}")
            if failure:
                if ready is not None and self._nothing_made(ready):
                    self.api.delete(SNAPSHOTS, name, self.namespace)
                raise failure[0]
            assert ready is not None
        return csi_pb2.CreateSnapshotResponse(snapshot=self._csi_snapshot(ready))

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.DeleteSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        parsed = parse_id(request.snapshot_id)
        if parsed is None or parsed[0] != self.namespace:
            return csi_pb2.DeleteSnapshotResponse()
        name = parsed[1]
        with self.locks.hold("snapshot:" + make_id(self.namespace, name)):
            snapshot = self.store.get(SNAPSHOTS, name) or self.api.get(SNAPSHOTS, name, self.namespace)
            if snapshot is None:
                return csi_pb2.DeleteSnapshotResponse()
            uid = snapshot["metadata"]["uid"]
            self.api.delete(SNAPSHOTS, name, self.namespace)
            self.store.wait_for(SNAPSHOTS, name, lambda o: o is None or o["metadata"]["uid"] != uid,
                                self._timeout(context), f"snapshot {name} to be deleted")
        return csi_pb2.DeleteSnapshotResponse()

    def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        parsed = parse_id(request.snapshot_id)
        snapshot = self.api.get(SNAPSHOTS, parsed[1], parsed[0]) if parsed else None
        if snapshot is None:
            raise NotFound(f"snapshot {request.snapshot_id} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=self._csi_snapshot(snapshot))

    def ControllerModifyVolume(self, request: csi_pb2.ControllerModifyVolumeRequest,
                               context: grpc.ServicerContext) -> csi_pb2.ControllerModifyVolumeResponse:
        raise Unimplemented("VolumeAttributesClass changes are not supported; change the StorageProfile instead")

    def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest,
                      context: grpc.ServicerContext) -> csi_pb2.ListSnapshotsResponse:
        snapshots = self.store.items(SNAPSHOTS)
        if request.snapshot_id:
            parsed = parse_id(request.snapshot_id)
            snapshots = [s for s in snapshots if parsed and parsed == (self.namespace, s["metadata"]["name"])]
        if request.source_volume_id:
            parsed = parse_id(request.source_volume_id)
            snapshots = [s for s in snapshots if parsed and parsed == (self.namespace, s["spec"]["volumeName"])]
        page, next_token = _paginate(snapshots, request.starting_token, request.max_entries)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._csi_snapshot(s)) for s in page],
            next_token=next_token)


TOKEN_PREFIX = "after:"


def _paginate(items: list[Obj], starting_token: str, max_entries: int) -> tuple[list[Obj], str]:
    """A page of a name-sorted list.

    The token names the first object of the next page; resuming starts at the first name not
    before it, so deleting that object between pages neither fails nor repeats entries.
    """
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    start = 0
    if starting_token:
        if not starting_token.startswith(TOKEN_PREFIX):
            raise Aborted(f"starting_token {starting_token!r} was not issued by this plugin; list from the start")
        names = [item["metadata"]["name"] for item in items]
        start = bisect.bisect_left(names, starting_token[len(TOKEN_PREFIX):])
    end = start + max_entries if max_entries else len(items)
    next_token = TOKEN_PREFIX + items[end]["metadata"]["name"] if end < len(items) else ""
    return items[start:end], next_token
