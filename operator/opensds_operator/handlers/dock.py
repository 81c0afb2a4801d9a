"""Dock handlers: the only writer of one StorageBackend (DESIGN.md invariant 1).

Built per process by `build_registry(backend, driver)`: the handlers only see Volumes whose
spec.backend names this backend (and whose placement the operator validated: Scheduled=True)
and Snapshots labelled with it. Every reconcile re-reads the backend first and creates only
what was never made, so a dock killed at any point finishes the job after a restart (kopf
`resume` handlers) without leaking or duplicating.

What the dock refuses to do, because each one loses data (issue 9):
- re-create an object that existed once (a Volume that was Available, a ready Snapshot) and is
  missing now: an unmounted disk, an inactive VG or an edited path must not turn into a blank
  volume the node then formats. It reports `BackendObjectMissing` and waits for it to return;
- delete an object it cannot prove is garbage: the orphan sweep only looks at objects tagged
  with this cluster's and this backend's identity, quarantines them first and purges them
  only after the quarantine period; a Retain deletion marks the object itself.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import kopf
from kubernetes.client.exceptions import ApiException

from .. import kube
from ..api import (
    AVAILABLE,
    BACKEND_LABEL,
    BACKENDS,
    CODE_BACKEND_OBJECT_MISSING,
    CODE_BACKEND_UNAVAILABLE,
    CODE_INVALID_PARAMETERS,
    CODE_SOURCE_NOT_FOUND,
    CREATING,
    DELETING,
    DOCK_FINALIZER,
    ERROR,
    EXPANDING,
    GROUP,
    POOL_LABEL,
    PROFILES,
    READY,
    SCHEDULED,
    SNAPSHOTS,
    VERSION,
    VOLUMES,
    dock_finalizer,
    snapshot_backend_id,
    volume_backend_id,
)
from ..conditions import get_condition, now, set_condition
from ..drivers.base import (
    BackendObject,
    Driver,
    DriverError,
    NotFound,
    Owner,
    PermanentDriverError,
    Source,
    SupportsQos,
)
from ..exports.base import ExportAuth, Exporter
from ..qos import volume_limits
from ..quantity import format_bytes, parse_bytes

log = logging.getLogger(__name__)


class ObjectGone(Exception):
    """The CR vanished (or started deleting) before the backend was touched: do nothing."""


class DockApi(Protocol):
    """The API calls the dock makes; `kube.KubeApi` in production, a fake in unit tests."""

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None: ...

    def list_all(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]: ...

    def patch_status(self, plural: str, name: str, status: dict[str, Any],
                     namespace: str | None = None) -> dict[str, Any] | None: ...

    def post_event(self, obj: dict[str, Any], reason: str, message: str, warning: bool = False,
                   component: str = "opensds") -> None: ...

    def secret_data(self, name: str, namespace: str) -> dict[str, str] | None: ...

    def remove_finalizer(self, plural: str, name: str, finalizer: str, namespace: str | None = None) -> None: ...

    def cluster_id(self) -> str: ...


def guarded(obj: dict[str, Any] | None, finalizer: str = DOCK_FINALIZER) -> bool:
    """True when the CR still exists, is not being deleted, and carries the dock's finalizer.

    The apiserver can complete a DELETE that raced with adding our finalizer, so the dock
    re-reads the object through its intent write and acts only when this holds; whatever a
    crash still leaves behind is found by the orphan collector.
    """
    if obj is None:
        return False
    meta = obj.get("metadata", {})
    present = meta.get("finalizers") or []
    return not meta.get("deletionTimestamp") and (finalizer in present or DOCK_FINALIZER in present)


def scheduled(status: dict[str, Any]) -> bool:
    """The operator validated this placement (DESIGN: the dock acts only on Scheduled=True)."""
    condition = get_condition(status.get("conditions"), SCHEDULED)
    return condition is not None and condition.get("status") == "True"


def volume_was_made(status: dict[str, Any]) -> bool:
    """The backend object existed once: it was Available (backendVolumeID is recorded only then).

    From here on a missing object is lost data to report, never something to create again."""
    phase = status.get("phase")
    return phase in (AVAILABLE, EXPANDING) or (bool(status.get("backendVolumeID")) and phase != CREATING)


def failure_code(error: Exception) -> str:
    """The stable code (api.CODE_*) the CSI controller relays as a gRPC code."""
    if isinstance(error, NotFound):
        return CODE_SOURCE_NOT_FOUND
    if isinstance(error, PermanentDriverError):
        return CODE_INVALID_PARAMETERS
    return CODE_BACKEND_UNAVAILABLE


class Dock:
    CAPACITY_COALESCE_SECONDS = 0.5
    MISSING_RECHECK_SECONDS = 30.0

    def __init__(self, backend: str, driver: Driver, exporters: dict[str, Exporter] | None = None,
                 api: DockApi | None = None, quarantine_seconds: float = 24 * 3600.0) -> None:
        self.backend = backend
        self.driver = driver
        self.exporters = exporters or {}
        self.api: DockApi = api if api is not None else kube.KubeApi()
        self.quarantine_seconds = quarantine_seconds
        self._capacity_lock = threading.Lock()
        self._capacity_pending = False

    def capacity_changed(self) -> None:
        """Publish capacity soon; a burst of changes within half a second costs one report."""
        with self._capacity_lock:
            if self._capacity_pending:
                return
            self._capacity_pending = True
        timer = threading.Timer(self.CAPACITY_COALESCE_SECONDS, self._publish_pending)
        timer.daemon = True
        timer.start()

    def _publish_pending(self) -> None:
        with self._capacity_lock:
            self._capacity_pending = False
        try:
            self.publish_capacity()
        except Exception:  # the steady timer reports again; never kill the timer thread loudly
            log.exception("capacity report failed")

    def record_intent(self, plural: str, body: kopf.Body, status: dict[str, Any]) -> None:
        """Write what is about to happen into status; raise ObjectGone unless it is still wanted."""
        meta = body["metadata"]
        result = self.api.patch_status(plural, meta["name"], status, meta["namespace"])
        if not guarded(result, dock_finalizer(self.backend)) or (result or {})["metadata"]["uid"] != meta["uid"]:
            raise ObjectGone(f"{plural} {meta['namespace']}/{meta['name']} is gone or being deleted")

    def owner(self, body: kopf.Body | dict[str, Any], kind: str, retained: bool = False) -> Owner:
        """The tag a backend object carries: this cluster, this backend, the CR it belongs to."""
        meta = body["metadata"]
        return Owner(self.api.cluster_id(), self.backend, kind, meta["namespace"], meta["name"], meta["uid"],
                     retained)

    # ------------------------------------------------------------ capacity

    def publish_capacity(self) -> None:
        obj = self.api.get(BACKENDS, self.backend)
        if obj is None:
            return
        conditions = (obj.get("status") or {}).get("conditions")
        try:
            pools = self.driver.pools()
        except (DriverError, OSError) as e:
            self.api.patch_status(BACKENDS, self.backend, {
                "lastProbeTime": now(),
                "conditions": set_condition(conditions, READY, False, "ProbeFailed", str(e)),
            })
            return
        self.api.patch_status(BACKENDS, self.backend, {
            "observedGeneration": obj["metadata"].get("generation"),
            "lastProbeTime": now(),
            "poolCount": len(pools),
            "freeHuman": format_bytes(sum(p.free_bytes for p in pools)),
            "pools": [{
                "name": p.name,
                "totalBytes": p.total_bytes,
                "freeBytes": p.free_bytes,
                "provisionedBytes": p.provisioned_bytes,
                "capabilities": replace(p.capabilities, protocols=p.capabilities.protocols
                                        | frozenset(self.exporters)).to_status(),
                "topology": dict(obj["spec"].get("topology", {}) or {}),
            } for p in pools],
            "conditions": set_condition(conditions, READY, True, "DockServing",
                                        f"dock serving {len(pools)} pool(s) with driver {self.driver.name}"),
        })

    def report_stopped(self) -> None:
        """On a clean shutdown: tell the scheduler right away instead of letting the report go stale."""
        obj = self.api.get(BACKENDS, self.backend)
        if obj is not None:
            self.api.patch_status(BACKENDS, self.backend, {"conditions": set_condition(
                (obj.get("status") or {}).get("conditions"), READY, False, "DockStopped",
                "the dock serving this backend stopped; volumes are not placed here until it is back")})

    # ------------------------------------------------------------ failures

    def _fail(self, plural: str, body: kopf.Body | dict[str, Any], error: Exception, phase: str | None = ERROR,
              code: str | None = None) -> None:
        """Ready=False with a stable code + one (de-duplicated) Warning Event saying what is wrong."""
        meta = body["metadata"]
        status = dict(body.get("status") or {})
        message = str(error)
        code = code or failure_code(error)
        patch: dict[str, Any] = {"code": code, "conditions": set_condition(
            status.get("conditions"), READY, False, code, message, meta.get("generation"))}
        if phase:
            patch["phase"] = phase
        try:
            self.api.patch_status(plural, meta["name"], patch, meta["namespace"])
        except ApiException as e:  # the condition is best effort; the retry reports again
            log.warning("could not record %s on %s/%s: %s", code, meta["namespace"], meta["name"], e.reason)
        self.api.post_event(dict(body), code, message, warning=True, component="opensds-dock")

    def _backend_object_missing(self, plural: str, body: kopf.Body | dict[str, Any], backend_id: str,
                                pool: str) -> None:
        """A made object is gone: say so and look again later; never make a blank one in its place."""
        message = (f"{backend_id} existed on {self.backend}/{pool} and is missing now; it is not re-created "
                   f"(that would hand out an empty volume). Check that the backend's storage is present "
                   f"(disk mounted, volume group active, spec.parameters unchanged); the dock looks again "
                   f"every {int(self.MISSING_RECHECK_SECONDS)} s")
        self._fail(plural, body, DriverError(message), phase=ERROR if plural == VOLUMES else None,
                   code=CODE_BACKEND_OBJECT_MISSING)
        raise kopf.TemporaryError(message, delay=self.MISSING_RECHECK_SECONDS)

    # ------------------------------------------------------------ volumes

    def _source(self, namespace: str, source: dict[str, Any]) -> Source:
        if source["kind"] == "Snapshot":
            snap = self.api.get(SNAPSHOTS, source["name"], namespace)
            if snap is None or not (snap.get("status") or {}).get("readyToUse"):
                raise kopf.TemporaryError(f"source Snapshot {source['name']} is not ready yet", delay=3)
            return Source("Snapshot", snapshot_backend_id(snap["metadata"]["uid"]))
        vol = self.api.get(VOLUMES, source["name"], namespace)
        if vol is None or (vol.get("status") or {}).get("phase") != AVAILABLE:
            raise kopf.TemporaryError(f"source Volume {source['name']} is not Available yet", delay=3)
        return Source("Volume", volume_backend_id(vol["metadata"]["uid"]))

    def _backend_qos(self, backend_id: str, profile: dict[str, Any], size_bytes: int) -> None:
        """Per-GiB limits change with the size; a backend with native QoS gets them (the node enforces too)."""
        limits = volume_limits(profile.get("spec") or {}, size_bytes)
        if limits and isinstance(self.driver, SupportsQos):
            self.driver.set_qos(backend_id, limits.iops, limits.bps)

    def reconcile_volume(self, body: kopf.Body) -> None:
        meta, spec = body["metadata"], body["spec"]
        name, namespace = meta["name"], meta["namespace"]
        backend_id, pool = volume_backend_id(meta["uid"]), spec["pool"]
        size = parse_bytes(spec["size"])
        status = dict(body.get("status") or {})
        if not scheduled(status):
            raise kopf.TemporaryError("waiting for the operator to validate the placement (Scheduled=True)", delay=5)
        try:
            info = self.driver.get_volume(backend_id, pool)
            if info is None and volume_was_made(status):
                self._backend_object_missing(VOLUMES, body, backend_id, pool)
            if info is None:
                self.record_intent(VOLUMES, body, {"phase": CREATING})
                source = self._source(namespace, dict(spec["source"])) if spec.get("source") else None
                profile = self.api.get(PROFILES, spec["profile"]) or {}
                thin = (profile.get("spec", {}).get("provisioning", {}) or {}).get("type", "thin") == "thin"
                log.info("creating %s for %s/%s", backend_id, namespace, name)
                info = self.driver.create_volume(backend_id, pool, size, thin, source, self.owner(body, "Volume"))
                self._backend_qos(backend_id, profile, info.size_bytes)
                event = ("Created", f"created {backend_id} ({format_bytes(info.size_bytes)}) in {self.backend}/{pool}")
            elif info.size_bytes < size:
                self.record_intent(VOLUMES, body, {"phase": EXPANDING})
                info = self.driver.extend_volume(backend_id, pool, size)
                self._backend_qos(backend_id, self.api.get(PROFILES, spec["profile"]) or {}, info.size_bytes)
                for exporter in self.exporters.values():
                    exporter.resize(backend_id)
                event = ("Expanded", f"expanded {backend_id} to {format_bytes(info.size_bytes)}")
            else:
                event = None
        except ObjectGone as e:
            log.info("not creating %s: %s", backend_id, e)
            return
        except PermanentDriverError as e:
            self._fail(VOLUMES, body, e)
            raise kopf.PermanentError(str(e)) from e
        except (DriverError, OSError) as e:
            self._fail(VOLUMES, body, e, phase=None)
            raise kopf.TemporaryError(str(e), delay=10) from e
        done = self.api.patch_status(VOLUMES, name, {
            "phase": AVAILABLE,
            "code": None,
            "backendVolumeID": backend_id,
            "capacityBytes": info.size_bytes,
            "devicePath": info.path or None,
            "observedGeneration": meta.get("generation"),
            "conditions": set_condition(status.get("conditions"), READY, True, "Available",
                                        f"{format_bytes(info.size_bytes)} in {self.backend}/{pool}",
                                        meta.get("generation")),
        }, namespace)
        if done is None or done["metadata"]["uid"] != meta["uid"]:
            log.info("%s/%s vanished while %s was made: removing it", namespace, name, backend_id)
            self.driver.delete_volume(backend_id, pool)
            return
        if event:
            self.api.post_event(dict(body), *event, component="opensds-dock")
            self.capacity_changed()
        if spec.get("publishedNodes") or status.get("publishedNodes"):
            # Always converge: after a reboot or a dock restart configfs is empty while the
            # API still says who may connect.
            self.reconcile_access(done)

    def reconcile_access(self, body: kopf.Body | dict[str, Any]) -> None:
        """Export the volume to exactly spec.publishedNodes and record what nodes need to connect.

        The export is rebuilt from this list on every reconcile, so an unpublish removes exactly
        that node's access and a restarted dock restores what the API says.
        """
        meta, spec = body["metadata"], body["spec"]
        status = dict(body.get("status") or {})
        if status.get("phase") not in (AVAILABLE, EXPANDING):
            raise kopf.TemporaryError("volume is not Available yet; exporting it later", delay=2)
        nodes = sorted(spec.get("publishedNodes") or [])
        backend_id = volume_backend_id(meta["uid"])
        profile = self.api.get(PROFILES, spec["profile"]) or {}
        protocol = (profile.get("spec") or {}).get("accessProtocol", "local")
        try:
            info = self.driver.get_volume(backend_id, spec["pool"])
            if info is None:
                self._backend_object_missing(VOLUMES, body, backend_id, spec["pool"])
            if protocol == self.driver.native_protocol:
                context = self.driver.export(backend_id, spec["pool"], nodes)
            else:
                exporter = self.exporters.get(protocol)
                if exporter is None:
                    raise PermanentDriverError(
                        f"backend {self.backend} does not export {protocol} (offers: "
                        f"{', '.join([self.driver.native_protocol, *sorted(self.exporters)])}); "
                        f"configure it in spec.parameters")
                if info is None or not info.path:
                    raise NotFound(f"volume {backend_id} has no device path in pool {spec['pool']}")
                context = exporter.export(backend_id, info.path, meta["uid"], nodes, self._export_auth(profile))
        except PermanentDriverError as e:
            self._fail(VOLUMES, body, e, phase=None)
            raise kopf.PermanentError(str(e)) from e
        except (DriverError, OSError) as e:
            self._fail(VOLUMES, body, e, phase=None)
            raise kopf.TemporaryError(str(e), delay=5) from e
        # The node enforces the profile's I/O limits (blk-cgroup io.max) from these entries.
        context.update(volume_limits(profile.get("spec") or {}, int(status.get("capacityBytes") or 0)).as_context())
        self.api.patch_status(VOLUMES, meta["name"], {"publishedNodes": nodes, "publishContext": context},
                              meta["namespace"])
        log.info("%s/%s exported to %s", meta["namespace"], meta["name"], ", ".join(nodes) or "nobody")

    def _export_auth(self, profile: dict[str, Any]) -> ExportAuth | None:
        """The credentials the target requires: from the profile's nodeStageSecretRef, or the operator's
        generated Secret for a network profile that did not opt out (credentials.py).

        Fails closed: a Secret lacking the protocol's keys is a PermanentDriverError naming the
        missing keys, never an export without authentication."""
        from ..credentials import node_stage_secret_ref

        spec = profile.get("spec") or {}
        ref = node_stage_secret_ref(spec)
        if not ref:
            return None
        source = (f"Secret {ref['namespace']}/{ref['name']} (node-stage secret of profile "
                  f"{(profile.get('metadata') or {}).get('name')})")
        data = self.api.secret_data(ref["name"], ref["namespace"])
        if data is None:
            if not spec.get("nodeStageSecretRef"):  # generated: the operator makes it, wait for that
                raise DriverError(f"{source} does not exist yet; the operator generates it")
            raise PermanentDriverError(f"{source} does not exist")
        return ExportAuth.from_secret(data).require(spec.get("accessProtocol", "local"), source)

    def delete_volume(self, body: kopf.Body) -> None:
        meta, spec = body["metadata"], body["spec"]
        if not scheduled(dict(body.get("status") or {})):
            # The dock acts only on Scheduled=True, so nothing was made for a placement the
            # operator never validated (e.g. pinned to a pool that does not exist): release it.
            self._drop_legacy_finalizer(VOLUMES, body)
            return
        self.api.patch_status(VOLUMES, meta["name"], {"phase": DELETING}, meta["namespace"])
        backend_id = volume_backend_id(meta["uid"])
        try:
            for exporter in self.exporters.values():
                exporter.unexport(backend_id)
            if spec.get("reclaimPolicy") == "Retain":
                # The record lives on the object itself: it outlives this CR and the backend's.
                if self.driver.get_volume(backend_id, spec["pool"]) is not None:
                    self.driver.set_owner(backend_id, spec["pool"], self.owner(body, "Volume", retained=True))
                self.api.post_event(dict(body), "Retained",
                                    f"{backend_id} kept on {self.backend} (reclaimPolicy Retain)",
                                    component="opensds-dock")
                self._drop_legacy_finalizer(VOLUMES, body)
                return
            log.info("deleting %s of %s/%s", backend_id, meta["namespace"], meta["name"])
            self.driver.delete_volume(backend_id, spec["pool"])
        except (DriverError, OSError) as e:
            self._fail(VOLUMES, body, e, phase=None)
            raise kopf.TemporaryError(str(e), delay=10) from e
        self._drop_legacy_finalizer(VOLUMES, body)
        self.capacity_changed()

    # ------------------------------------------------------------ snapshots

    def _snapshot_exists(self, snap_id: str, pool: str) -> bool:
        return snap_id in self.driver.list_objects(pool)

    def reconcile_snapshot(self, body: kopf.Body) -> None:
        meta, spec = body["metadata"], body["spec"]
        namespace = meta["namespace"]
        pool = meta["labels"][POOL_LABEL]
        snap_id = snapshot_backend_id(meta["uid"])
        already = bool((body.get("status") or {}).get("readyToUse"))
        if already:
            # A ready snapshot is a point in time: if it is gone, taking a new one now would
            # silently hand out different data under the same name.
            try:
                if not self._snapshot_exists(snap_id, pool):
                    self._backend_object_missing(SNAPSHOTS, body, snap_id, pool)
            except (DriverError, OSError) as e:
                raise kopf.TemporaryError(str(e), delay=10) from e
            return
        volume = self.api.get(VOLUMES, spec["volumeName"], namespace)
        if volume is None:
            raise kopf.TemporaryError(f"Volume {spec['volumeName']} is gone", delay=10)
        if (volume.get("status") or {}).get("phase") not in (AVAILABLE, EXPANDING):
            raise kopf.TemporaryError(f"Volume {spec['volumeName']} is not Available yet", delay=3)
        try:
            self.record_intent(SNAPSHOTS, body, {"backendSnapshotID": snap_id, "backend": self.backend,
                                                 "pool": pool})
            info = self.driver.create_snapshot(snap_id, pool, volume_backend_id(volume["metadata"]["uid"]),
                                               self.owner(body, "Snapshot"))
        except ObjectGone as e:
            log.info("not creating %s: %s", snap_id, e)
            return
        except PermanentDriverError as e:
            self._fail(SNAPSHOTS, body, e, phase=None)
            raise kopf.PermanentError(str(e)) from e
        except (DriverError, OSError) as e:
            self._fail(SNAPSHOTS, body, e, phase=None)
            raise kopf.TemporaryError(str(e), delay=10) from e
        done = self.api.patch_status(SNAPSHOTS, meta["name"], {
            "readyToUse": True,
            "code": None,
            "sizeBytes": info.size_bytes,
            "creationTime": info.created_at,
            "backendSnapshotID": snap_id,
            "backend": self.backend,
            "pool": pool,
            "observedGeneration": meta.get("generation"),
            "conditions": set_condition((body.get("status") or {}).get("conditions"), READY, True, "ReadyToUse",
                                        f"snapshot {snap_id} of {spec['volumeName']}"),
        }, namespace)
        if done is None or done["metadata"]["uid"] != meta["uid"]:
            self.driver.delete_snapshot(snap_id, pool)
            return
        self.api.post_event(dict(body), "SnapshotCreated", f"created {snap_id}", component="opensds-dock")
        self.capacity_changed()

    def delete_snapshot(self, body: kopf.Body) -> None:
        meta = body["metadata"]
        try:
            self.driver.delete_snapshot(snapshot_backend_id(meta["uid"]), meta["labels"][POOL_LABEL])
        except (DriverError, OSError) as e:
            raise kopf.TemporaryError(str(e), delay=10) from e
        self._drop_legacy_finalizer(SNAPSHOTS, body)
        self.capacity_changed()

    def _drop_legacy_finalizer(self, plural: str, body: kopf.Body) -> None:
        """Objects made before per-backend finalizers also carry the shared one: the backend
        object is gone now, so release it too (kopf only removes its own)."""
        meta = body["metadata"]
        if DOCK_FINALIZER in (meta.get("finalizers") or []):
            self.api.remove_finalizer(plural, meta["name"], DOCK_FINALIZER, meta["namespace"])

    # ------------------------------------------------------------ orphans

    def _purge_expired(self, obj: BackendObject, owner: Owner, pool: str, live: set[str],
                       backend: dict[str, Any]) -> bool:
        """Purge a quarantined object once its time is up, unless its CR exists (then it was
        quarantined by hand or by mistake: keep it and say so)."""
        if owner.uid in live:
            self.api.post_event(backend, "QuarantinedButOwned", (
                f"{obj.backend_id} is quarantined although its {owner.kind} {owner.namespace}/{owner.name} exists; "
                f"it is kept: move it back by hand"), warning=True, component="opensds-dock")
            return False
        assert obj.quarantined_at is not None
        age = time.time() - obj.quarantined_at
        if age < self.quarantine_seconds:
            return False
        log.warning("purging %s in %s/%s (quarantined %.0f s ago)", obj.backend_id, self.backend, pool, age)
        self.driver.purge(obj.backend_id, pool)
        self.api.post_event(backend, "OrphanPurged", f"purged {obj.backend_id} of {owner.kind} "
                            f"{owner.namespace}/{owner.name} after its quarantine", component="opensds-dock")
        return True

    def collect_orphans(self) -> list[str]:
        """Quarantine backend objects of ours whose CR no longer exists; purge expired quarantine.

        Only objects tagged with this cluster's and this backend's identity are considered:
        untagged objects and other clusters' are never touched (counted in status). The
        backend is scanned before the API is listed: a CR always exists before its object is
        made, so an object found first whose CR is missing later is garbage, and it is still
        kept (renamed aside) for the quarantine period before it is purged. Returns the ids
        quarantined or purged in this pass.
        """
        scanned: dict[str, list[BackendObject]] = {pool.name: self.driver.scan(pool.name)
                                                   for pool in self.driver.pools()}
        cluster = self.api.cluster_id()
        live = {v["metadata"]["uid"] for v in self.api.list_all(VOLUMES)}
        live |= {s["metadata"]["uid"] for s in self.api.list_all(SNAPSHOTS)}
        backend = self.api.get(BACKENDS, self.backend) or {"metadata": {"name": self.backend}}
        acted: list[str] = []
        foreign, quarantined = 0, 0
        for pool, objects in scanned.items():
            for obj in objects:
                owner = obj.owner
                if owner is None or owner.cluster != cluster or owner.backend != self.backend:
                    foreign += 1
                    continue
                if owner.retained or (owner.uid in live and obj.quarantined_at is None):
                    continue
                try:
                    if obj.quarantined_at is not None:
                        quarantined += 1
                        if self._purge_expired(obj, owner, pool, live, backend):
                            acted.append(obj.backend_id)
                            quarantined -= 1
                        continue
                    log.warning("quarantining %s in %s/%s: its %s %s/%s (uid %s) no longer exists", obj.backend_id,
                                self.backend, pool, owner.kind, owner.namespace, owner.name, owner.uid)
                    self.driver.quarantine(obj.backend_id, pool)
                except (DriverError, OSError) as e:  # one refusal (e.g. RBD dependants) must not stop the pass
                    log.warning("orphan sweep skipped %s in %s/%s: %s", obj.backend_id, self.backend, pool, e)
                    continue
                self.api.post_event(backend, "OrphanQuarantined", (
                    f"{obj.backend_id} belonged to {owner.kind} {owner.namespace}/{owner.name} (uid {owner.uid}), "
                    f"which no longer exists; kept aside for {self.quarantine_seconds / 3600:g} h, then purged"),
                    warning=True, component="opensds-dock")
                acted.append(obj.backend_id)
                quarantined += 1
        self.api.patch_status(BACKENDS, self.backend, {"quarantinedObjects": quarantined,
                                                       "foreignObjects": foreign})
        if acted:
            self.capacity_changed()
        return acted


def reported(dock: Dock, plural: str, body: kopf.Body, action: Callable[[kopf.Body], None]) -> None:
    """Run a reconcile; anything unexpected (an API error, a library's own exception) becomes a
    Ready=False condition with an Event and a retry, instead of a traceback and silence."""
    try:
        action(body)
    except (kopf.TemporaryError, kopf.PermanentError):
        raise
    except ApiException as e:
        dock._fail(plural, body, DriverError(f"Kubernetes API: {e.status} {e.reason}"), phase=None)
        raise kopf.TemporaryError(f"Kubernetes API: {e.status} {e.reason}", delay=5) from e
    except Exception as e:
        log.exception("unexpected error handling %s %s", plural, body["metadata"]["name"])
        dock._fail(plural, body, DriverError(f"unexpected {type(e).__name__}: {e}"), phase=None)
        raise kopf.TemporaryError(f"unexpected {type(e).__name__}: {e}", delay=10) from e


def build_registry(dock: Dock, capacity_interval: float = 30.0,
                   orphan_interval: float = 300.0) -> kopf.OperatorRegistry:
    """kopf handlers for one backend, filtered to the objects placed on it."""
    registry = kopf.OperatorRegistry()
    mine_volume = {"when": lambda spec, **_: spec.get("backend") == dock.backend and bool(spec.get("pool"))}
    mine_snapshot = {"labels": {BACKEND_LABEL: dock.backend}}
    mine_backend = {"when": lambda name, **_: name == dock.backend}

    @kopf.on.resume(GROUP, VERSION, VOLUMES, registry=registry, **mine_volume)  # type: ignore[arg-type]
    @kopf.on.create(GROUP, VERSION, VOLUMES, registry=registry, **mine_volume)  # type: ignore[arg-type]
    @kopf.on.update(GROUP, VERSION, VOLUMES, field="spec.size", registry=registry,
                    **mine_volume)  # type: ignore[arg-type]
    def volume_reconcile(body: kopf.Body, **_: Any) -> None:
        reported(dock, VOLUMES, body, dock.reconcile_volume)

    @kopf.on.update(GROUP, VERSION, VOLUMES, field="spec.publishedNodes", registry=registry,
                    **mine_volume)  # type: ignore[arg-type]
    def volume_access(body: kopf.Body, **_: Any) -> None:
        reported(dock, VOLUMES, body, dock.reconcile_access)

    @kopf.on.delete(GROUP, VERSION, VOLUMES, registry=registry, **mine_volume)  # type: ignore[arg-type]
    def volume_delete(body: kopf.Body, **_: Any) -> None:
        reported(dock, VOLUMES, body, dock.delete_volume)

    @kopf.on.resume(GROUP, VERSION, SNAPSHOTS, registry=registry, **mine_snapshot)  # type: ignore[arg-type]
    @kopf.on.create(GROUP, VERSION, SNAPSHOTS, registry=registry, **mine_snapshot)  # type: ignore[arg-type]
    def snapshot_reconcile(body: kopf.Body, **_: Any) -> None:
        reported(dock, SNAPSHOTS, body, dock.reconcile_snapshot)

    @kopf.on.delete(GROUP, VERSION, SNAPSHOTS, registry=registry, **mine_snapshot)  # type: ignore[arg-type]
    def snapshot_delete(body: kopf.Body, **_: Any) -> None:
        reported(dock, SNAPSHOTS, body, dock.delete_snapshot)

    @kopf.on.resume(GROUP, VERSION, BACKENDS, registry=registry, **mine_backend)  # type: ignore[arg-type]
    @kopf.on.create(GROUP, VERSION, BACKENDS, registry=registry, **mine_backend)  # type: ignore[arg-type]
    def backend_register(**_: Any) -> None:
        dock.publish_capacity()
        dock.collect_orphans()

    @kopf.timer(GROUP, VERSION, BACKENDS, interval=capacity_interval, registry=registry,
                **mine_backend)  # type: ignore[arg-type]
    def backend_capacity(**_: Any) -> None:
        dock.publish_capacity()

    @kopf.on.cleanup(registry=registry)
    def dock_stopping(**_: Any) -> None:
        dock.report_stopped()

    @kopf.timer(GROUP, VERSION, BACKENDS, interval=orphan_interval, initial_delay=orphan_interval,
                registry=registry, **mine_backend)  # type: ignore[arg-type]
    def backend_orphans(**_: Any) -> None:
        dock.collect_orphans()

    return registry
