"""Dock handlers: the only writer of one StorageBackend (DESIGN.md invariant 1).

Built per process by `build_registry(backend, driver)`: the handlers only see Volumes whose
spec.backend names this backend and Snapshots labelled with it. Every reconcile re-reads
the backend first and creates only what is missing, so a dock killed at any point
finishes the job after a restart (kopf `resume` handlers) without leaking or duplicating.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

import kopf

from .. import kube
from ..api import (
    AVAILABLE,
    BACKEND_LABEL,
    BACKENDS,
    CREATING,
    DELETING,
    DOCK_FINALIZER,
    ERROR,
    EXPANDING,
    GROUP,
    POOL_LABEL,
    PROFILES,
    READY,
    SNAPSHOTS,
    VERSION,
    VOLUMES,
    snapshot_backend_id,
    volume_backend_id,
)
from ..conditions import now, set_condition
from ..drivers.base import Driver, DriverError, NotFound, PermanentDriverError, Source, SupportsQos
from ..exports.base import ExportAuth, Exporter
from ..qos import volume_limits
from ..quantity import format_bytes, parse_bytes

log = logging.getLogger(__name__)


class ObjectGone(Exception):
    """The CR vanished (or started deleting) before the backend was touched: do nothing."""


def guarded(obj: dict[str, Any] | None) -> bool:
    """True when the CR still exists, is not being deleted, and carries the dock's finalizer.

    The apiserver can complete a DELETE that raced with adding our finalizer, so the dock
    re-reads the object through its intent write and acts only when this holds; whatever a
    crash still leaves behind is found by the orphan collector.
    """
    if obj is None:
        return False
    meta = obj.get("metadata", {})
    return not meta.get("deletionTimestamp") and DOCK_FINALIZER in (meta.get("finalizers") or [])


class Dock:
    CAPACITY_COALESCE_SECONDS = 0.5

    def __init__(self, backend: str, driver: Driver, exporters: dict[str, Exporter] | None = None) -> None:
        self.backend = backend
        self.driver = driver
        self.exporters = exporters or {}
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
        result = kube.patch_status(plural, meta["name"], status, meta["namespace"])
        if not guarded(result) or (result or {})["metadata"]["uid"] != meta["uid"]:
            raise ObjectGone(f"{plural} {meta['namespace']}/{meta['name']} is gone or being deleted")

    # ------------------------------------------------------------ capacity

    def publish_capacity(self) -> None:
        obj = kube.get(BACKENDS, self.backend)
        if obj is None:
            return
        conditions = (obj.get("status") or {}).get("conditions")
        try:
            pools = self.driver.pools()
        except (DriverError, OSError) as e:
            kube.patch_status(BACKENDS, self.backend, {
                "lastProbeTime": now(),
                "conditions": set_condition(conditions, READY, False, "ProbeFailed", str(e)),
            })
            return
        kube.patch_status(BACKENDS, self.backend, {
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
        obj = kube.get(BACKENDS, self.backend)
        if obj is not None:
            kube.patch_status(BACKENDS, self.backend, {"conditions": set_condition(
                (obj.get("status") or {}).get("conditions"), READY, False, "DockStopped",
                "the dock serving this backend stopped; volumes are not placed here until it is back")})

    # ------------------------------------------------------------ volumes

    def _fail(self, plural: str, body: kopf.Body | dict[str, Any], error: Exception, phase: str | None = ERROR) -> None:
        meta = body["metadata"]
        status = dict(body.get("status") or {})
        message = str(error)
        patch: dict[str, Any] = {"conditions": set_condition(
            status.get("conditions"), READY, False, type(error).__name__, message, meta.get("generation"))}
        if phase:
            patch["phase"] = phase
        kube.patch_status(plural, meta["name"], patch, meta["namespace"])
        kube.post_event(dict(body), "BackendError", message, warning=True, component="opensds-dock")

    def _source(self, namespace: str, source: dict[str, Any]) -> Source:
        if source["kind"] == "Snapshot":
            snap = kube.get(SNAPSHOTS, source["name"], namespace)
            if snap is None or not (snap.get("status") or {}).get("readyToUse"):
                raise kopf.TemporaryError(f"source Snapshot {source['name']} is not ready yet", delay=3)
            return Source("Snapshot", snapshot_backend_id(snap["metadata"]["uid"]))
        vol = kube.get(VOLUMES, source["name"], namespace)
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
        try:
            info = self.driver.get_volume(backend_id, pool)
            if info is None:
                self.record_intent(VOLUMES, body, {"phase": CREATING, "backendVolumeID": backend_id})
                source = self._source(namespace, dict(spec["source"])) if spec.get("source") else None
                profile = kube.get(PROFILES, spec["profile"]) or {}
                thin = (profile.get("spec", {}).get("provisioning", {}) or {}).get("type", "thin") == "thin"
                log.info("creating %s for %s/%s", backend_id, namespace, name)
                info = self.driver.create_volume(backend_id, pool, size, thin, source)
                self._backend_qos(backend_id, profile, info.size_bytes)
                event = ("Created", f"created {backend_id} ({format_bytes(info.size_bytes)}) in {self.backend}/{pool}")
            elif info.size_bytes < size:
                self.record_intent(VOLUMES, body, {"phase": EXPANDING})
                info = self.driver.extend_volume(backend_id, pool, size)
                self._backend_qos(backend_id, kube.get(PROFILES, spec["profile"]) or {}, info.size_bytes)
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
        done = kube.patch_status(VOLUMES, name, {
            "phase": AVAILABLE,
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
            kube.post_event(dict(body), *event, component="opensds-dock")
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
        profile = kube.get(PROFILES, spec["profile"]) or {}
        protocol = (profile.get("spec") or {}).get("accessProtocol", "local")
        try:
            if protocol == self.driver.native_protocol:
                context = self.driver.export(backend_id, spec["pool"], nodes)
            else:
                exporter = self.exporters.get(protocol)
                if exporter is None:
                    raise PermanentDriverError(
                        f"backend {self.backend} does not export {protocol} (offers: "
                        f"{', '.join([self.driver.native_protocol, *sorted(self.exporters)])}); "
                        f"configure it in spec.parameters")
                info = self.driver.get_volume(backend_id, spec["pool"])
                if info is None or not info.path:
                    raise NotFound(f"volume {backend_id} not found in pool {spec['pool']}")
                context = exporter.export(backend_id, info.path, meta["uid"], nodes, self._export_auth(profile))
        except PermanentDriverError as e:
            self._fail(VOLUMES, body, e, phase=None)
            raise kopf.PermanentError(str(e)) from e
        except (DriverError, OSError) as e:
            self._fail(VOLUMES, body, e, phase=None)
            raise kopf.TemporaryError(str(e), delay=5) from e
        # The node enforces the profile's I/O limits (blk-cgroup io.max) from these entries.
        context.update(volume_limits(profile.get("spec") or {}, int(status.get("capacityBytes") or 0)).as_context())
        kube.patch_status(VOLUMES, meta["name"], {"publishedNodes": nodes, "publishContext": context},
                          meta["namespace"])
        log.info("%s/%s exported to %s", meta["namespace"], meta["name"], ", ".join(nodes) or "nobody")

    @staticmethod
    def _export_auth(profile: dict[str, Any]) -> ExportAuth | None:
        """The credentials in the Secret the profile's nodes attach with (its nodeStageSecretRef)."""
        ref = (profile.get("spec") or {}).get("nodeStageSecretRef")
        if not ref:
            return None
        data = kube.secret_data(ref["name"], ref["namespace"])
        if data is None:
            raise PermanentDriverError(f"Secret {ref['namespace']}/{ref['name']} (nodeStageSecretRef of profile "
                                       f"{profile['metadata']['name']}) does not exist")
        return ExportAuth.from_secret(data)

    def delete_volume(self, body: kopf.Body) -> None:
        meta, spec = body["metadata"], body["spec"]
        kube.patch_status(VOLUMES, meta["name"], {"phase": DELETING}, meta["namespace"])
        backend_id = volume_backend_id(meta["uid"])
        if spec.get("reclaimPolicy") == "Retain":
            self.record_retained(backend_id, f"{meta['namespace']}/{meta['name']}")
            kube.post_event(dict(body), "Retained", f"{backend_id} kept on {self.backend} (reclaimPolicy Retain)",
                            component="opensds-dock")
            return
        log.info("deleting %s of %s/%s", backend_id, meta["namespace"], meta["name"])
        try:
            for exporter in self.exporters.values():
                exporter.unexport(backend_id)
            self.driver.delete_volume(backend_id, spec["pool"])
        except (DriverError, OSError) as e:
            self._fail(VOLUMES, body, e, phase=None)
            raise kopf.TemporaryError(str(e), delay=10) from e
        self.capacity_changed()

    # ------------------------------------------------------------ snapshots

    def reconcile_snapshot(self, body: kopf.Body) -> None:
        meta, spec = body["metadata"], body["spec"]
        namespace = meta["namespace"]
        pool = meta["labels"][POOL_LABEL]
        volume = kube.get(VOLUMES, spec["volumeName"], namespace)
        if volume is None:
            raise kopf.TemporaryError(f"Volume {spec['volumeName']} is gone", delay=10)
        if (volume.get("status") or {}).get("phase") not in (AVAILABLE, EXPANDING):
            raise kopf.TemporaryError(f"Volume {spec['volumeName']} is not Available yet", delay=3)
        snap_id = snapshot_backend_id(meta["uid"])
        already = (body.get("status") or {}).get("readyToUse")
        try:
            if not already:
                self.record_intent(SNAPSHOTS, body, {"backendSnapshotID": snap_id, "backend": self.backend,
                                                     "pool": pool})
            info = self.driver.create_snapshot(snap_id, pool, volume_backend_id(volume["metadata"]["uid"]))
        except ObjectGone as e:
            log.info("not creating %s: %s", snap_id, e)
            return
        except PermanentDriverError as e:
            self._fail(SNAPSHOTS, body, e, phase=None)
            raise kopf.PermanentError(str(e)) from e
        except (DriverError, OSError) as e:
            self._fail(SNAPSHOTS, body, e, phase=None)
            raise kopf.TemporaryError(str(e), delay=10) from e
        done = kube.patch_status(SNAPSHOTS, meta["name"], {
            "readyToUse": True,
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
        if not already:
            kube.post_event(dict(body), "SnapshotCreated", f"created {snap_id}", component="opensds-dock")
            self.capacity_changed()

    def delete_snapshot(self, body: kopf.Body) -> None:
        meta = body["metadata"]
        try:
            self.driver.delete_snapshot(snapshot_backend_id(meta["uid"]), meta["labels"][POOL_LABEL])
        except (DriverError, OSError) as e:
            raise kopf.TemporaryError(str(e), delay=10) from e
        self.capacity_changed()


    # ------------------------------------------------------------ retention and orphans

    def record_retained(self, backend_id: str, owner: str) -> None:
        """Remember a kept volume in the backend's status so the orphan collector leaves it alone."""
        backend = kube.get(BACKENDS, self.backend) or {}
        retained = list((backend.get("status") or {}).get("retainedVolumes", []))
        if not any(r.get("id") == backend_id for r in retained):
            retained.append({"id": backend_id, "volume": owner, "retainedAt": now()})
            kube.patch_status(BACKENDS, self.backend, {"retainedVolumes": retained})

    def collect_orphans(self) -> list[str]:
        """Delete backend objects whose CR no longer exists (crash leftovers); returns their ids.

        The backend is listed before the API: a CR always exists before its object is made,
        so an object found first whose CR is missing later is garbage.
        """
        on_backend = {pool.name: self.driver.list_objects(pool.name) for pool in self.driver.pools()}
        wanted = {volume_backend_id(v["metadata"]["uid"]) for v in kube.list_all(VOLUMES)}
        wanted |= {snapshot_backend_id(s["metadata"]["uid"]) for s in kube.list_all(SNAPSHOTS)}
        backend = kube.get(BACKENDS, self.backend) or {}
        wanted |= {r["id"] for r in (backend.get("status") or {}).get("retainedVolumes", [])}
        collected = []
        for pool, ids in on_backend.items():
            for backend_id in ids:
                if backend_id in wanted or not backend_id.startswith(("vol-", "snap-")):
                    continue
                log.warning("collecting orphan %s in %s/%s (no CR owns it)", backend_id, self.backend, pool)
                if backend_id.startswith("vol-"):
                    self.driver.delete_volume(backend_id, pool)
                else:
                    self.driver.delete_snapshot(backend_id, pool)
                collected.append(backend_id)
        if collected:
            self.capacity_changed()
        return collected


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
        dock.reconcile_volume(body)

    @kopf.on.update(GROUP, VERSION, VOLUMES, field="spec.publishedNodes", registry=registry,
                    **mine_volume)  # type: ignore[arg-type]
    def volume_access(body: kopf.Body, **_: Any) -> None:
        dock.reconcile_access(body)

    @kopf.on.delete(GROUP, VERSION, VOLUMES, registry=registry, **mine_volume)  # type: ignore[arg-type]
    def volume_delete(body: kopf.Body, **_: Any) -> None:
        dock.delete_volume(body)

    @kopf.on.resume(GROUP, VERSION, SNAPSHOTS, registry=registry, **mine_snapshot)  # type: ignore[arg-type]
    @kopf.on.create(GROUP, VERSION, SNAPSHOTS, registry=registry, **mine_snapshot)  # type: ignore[arg-type]
    def snapshot_reconcile(body: kopf.Body, **_: Any) -> None:
        dock.reconcile_snapshot(body)

    @kopf.on.delete(GROUP, VERSION, SNAPSHOTS, registry=registry, **mine_snapshot)  # type: ignore[arg-type]
    def snapshot_delete(body: kopf.Body, **_: Any) -> None:
        dock.delete_snapshot(body)

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
