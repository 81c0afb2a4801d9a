"""Ceph RBD driver over the rados/rbd Python bindings (Debian's, made importable from the venv).

Volumes are images `vol-<uid>`, snapshots are RBD snapshots `snap-<uid>` of their volume's
image. A small omap object (`opensds.snapshots`) maps each snapshot to its image, so a
restore finds its parent with one read instead of scanning every image (as ceph-csi keeps
its journal in omaps). Clones are layered on a protected snapshot and flattened once the
parent chain reaches `cloneDepth`, so deep chains never slow reads down. Profile QoS becomes
librbd's `rbd_qos_iops_limit` / `rbd_qos_bps_limit` image metadata.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from ..scheduler import Capabilities
from .base import DriverError, NotFound, PermanentDriverError, PoolStats, SnapshotInfo, Source, VolumeInfo

log = logging.getLogger(__name__)
SNAPSHOT_INDEX = "opensds.snapshots"
CLONE_SOURCE_PREFIX = "clone-source-"


def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as e:
        raise PermanentDriverError("the rados/rbd Python bindings are missing: apt-get install python3-rados "
                                   "python3-rbd, then `make venv` links them into the venv") from e
    return rados, rbd


class RbdDriver:
    name = "ceph"
    native_protocol = "rbd"  # krbd maps images itself: no target

    def __init__(self, conf: str, pool: str, user: str, keyring: str | None = None, key: str | None = None,
                 clone_depth: int = 8, connect_timeout: int = 10) -> None:
        self.rados, self.rbd = _bindings()
        options = {"key": key} if key else ({"keyring": keyring} if keyring else {})
        self.cluster = self.rados.Rados(conffile=conf, rados_id=user, conf=options)
        try:
            self.cluster.connect(timeout=connect_timeout)
        except self.rados.Error as e:
            raise DriverError(f"cannot connect to Ceph as client.{user}: {e}") from e
        self.pool = pool
        self.clone_depth = clone_depth

    def _check_pool(self, pool: str) -> None:
        if pool != self.pool:
            raise PermanentDriverError(f"unknown pool {pool!r} (this backend serves {self.pool!r})")

    @contextmanager
    def _ioctx(self) -> Iterator[Any]:
        ioctx = self.cluster.open_ioctx(self.pool)
        try:
            yield ioctx
        finally:
            ioctx.close()

    @contextmanager
    def _image(self, ioctx: Any, name: str, snapshot: str | None = None) -> Iterator[Any]:
        try:
            image = self.rbd.Image(ioctx, name, snapshot=snapshot)
        except self.rbd.ImageNotFound as e:
            raise NotFound(f"image {self.pool}/{name} not found") from e
        try:
            yield image
        finally:
            image.close()

    # ------------------------------------------------------------ capacity

    def pools(self) -> list[PoolStats]:
        ret, out, err = self.cluster.mon_command(json.dumps({"prefix": "df", "format": "json"}), b"")
        if ret != 0:
            raise DriverError(f"ceph df failed: {err}")
        stats = next((p["stats"] for p in json.loads(out)["pools"] if p["name"] == self.pool), None)
        if stats is None:
            if self.cluster.pool_exists(self.pool):  # the mgr's statistics trail a new pool by seconds
                raise DriverError(f"no statistics for Ceph pool {self.pool!r} yet")
            raise PermanentDriverError(f"Ceph pool {self.pool!r} does not exist")
        with self._ioctx() as ioctx:
            provisioned = 0
            for name in self.rbd.RBD().list(ioctx):
                if name.startswith("vol-"):
                    with self._image(ioctx, name) as image:
                        provisioned += image.size()
        used, free = int(stats["stored"]), int(stats["max_avail"])
        return [PoolStats(self.pool, used + free, free, provisioned, Capabilities(
            storage_types=frozenset({"block"}), thin=True, thick=False, snapshot=True, clone=True,
            multi_attach=True, protocols=frozenset({"rbd"}), custom={}, max_volume_bytes=0))]

    # ------------------------------------------------------------ volumes

    def get_volume(self, backend_id: str, pool: str) -> VolumeInfo | None:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            try:
                with self._image(ioctx, backend_id) as image:
                    size = image.size()
            except NotFound:
                return None
        return VolumeInfo(backend_id, size, size, "")

    def create_volume(self, backend_id: str, pool: str, size_bytes: int, thin: bool,
                      source: Source | None = None) -> VolumeInfo:
        self._check_pool(pool)
        if not thin:
            raise PermanentDriverError("RBD images are always thin; use a thin profile")
        existing = self.get_volume(backend_id, pool)
        if existing is not None:
            return existing
        with self._ioctx() as ioctx:
            if source is None:
                self.rbd.RBD().create(ioctx, backend_id, size_bytes, old_format=False,
                                      features=self.rbd.RBD_FEATURE_LAYERING)
            elif source.kind == "Snapshot":
                parent = self._snapshot_parent(ioctx, source.backend_id)
                self._clone(ioctx, parent, source.backend_id, backend_id)
            else:
                snap = CLONE_SOURCE_PREFIX + backend_id
                with self._image(ioctx, source.backend_id) as image:
                    if snap not in {s["name"] for s in image.list_snaps()}:
                        image.create_snap(snap)
                self._clone(ioctx, source.backend_id, snap, backend_id, flatten=True)
                self._remove_snap(ioctx, source.backend_id, snap)
            with self._image(ioctx, backend_id) as image:
                if image.size() < size_bytes:
                    image.resize(size_bytes)
        log.info("created %s/%s (%d bytes)", self.pool, backend_id, size_bytes)
        return VolumeInfo(backend_id, size_bytes, size_bytes, "")

    def _depth(self, ioctx: Any, name: str) -> int:
        depth = 0
        while True:
            with self._image(ioctx, name) as image:
                try:
                    _pool, name, _snap = image.parent_info()
                except self.rbd.ImageNotFound:
                    return depth
            depth += 1

    def _clone(self, ioctx: Any, parent: str, snap: str, child: str, flatten: bool = False) -> None:
        with self._image(ioctx, parent) as image:
            if not image.is_protected_snap(snap):
                image.protect_snap(snap)
        self.rbd.RBD().clone(ioctx, parent, snap, ioctx, child, features=self.rbd.RBD_FEATURE_LAYERING)
        if flatten or self._depth(ioctx, child) >= self.clone_depth:
            with self._image(ioctx, child) as image:
                image.flatten()

    def delete_volume(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            try:
                with self._image(ioctx, backend_id) as image:
                    snaps = [s["name"] for s in image.list_snaps()]
            except NotFound:
                return
            if any(s.startswith("snap-") for s in snaps):
                raise DriverError(f"{backend_id} still has snapshots {', '.join(snaps)}; they go first")
            for snap in snaps:  # leftovers of an interrupted clone
                self._remove_snap(ioctx, backend_id, snap)
            try:
                self.rbd.RBD().remove(ioctx, backend_id)
            except self.rbd.ImageNotFound:
                pass
            except self.rbd.ImageBusy as e:
                raise DriverError(f"{backend_id} is still mapped or open somewhere: {e}") from e

    def extend_volume(self, backend_id: str, pool: str, size_bytes: int) -> VolumeInfo:
        self._check_pool(pool)
        with self._ioctx() as ioctx, self._image(ioctx, backend_id) as image:
            if image.size() < size_bytes:
                image.resize(size_bytes)
            size = image.size()
        return VolumeInfo(backend_id, size, size, "")

    def set_qos(self, backend_id: str, max_iops: int | None, max_bps: int | None) -> None:
        """librbd QoS as image metadata (honoured by librbd clients; krbd ignores it)."""
        with self._ioctx() as ioctx, self._image(ioctx, backend_id) as image:
            for key, value in (("conf_rbd_qos_iops_limit", max_iops), ("conf_rbd_qos_bps_limit", max_bps)):
                if value:
                    image.metadata_set(key, str(value))

    # ------------------------------------------------------------ snapshots

    def _snapshot_parent(self, ioctx: Any, snap_id: str) -> str:
        with self.rados.ReadOpCtx() as op:
            values, _ = ioctx.get_omap_vals_by_keys(op, (snap_id,))
            try:
                ioctx.operate_read_op(op, SNAPSHOT_INDEX)
            except self.rados.ObjectNotFound:
                raise NotFound(f"snapshot {snap_id} not found") from None
            found = dict(values)
        if snap_id not in found:
            raise NotFound(f"snapshot {snap_id} not found")
        return bytes(found[snap_id]).decode()

    def _index(self, ioctx: Any, snap_id: str, image: str | None) -> None:
        with self.rados.WriteOpCtx() as op:
            if image is None:
                ioctx.remove_omap_keys(op, (snap_id,))
            else:
                ioctx.set_omap(op, (snap_id,), (image.encode(),))
            ioctx.operate_write_op(op, SNAPSHOT_INDEX)

    def create_snapshot(self, backend_id: str, pool: str, volume_id: str) -> SnapshotInfo:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            self._index(ioctx, backend_id, volume_id)  # intent first: the sweep can find it
            with self._image(ioctx, volume_id) as image:
                snaps = {s["name"]: s for s in image.list_snaps()}
                if backend_id not in snaps:
                    image.create_snap(backend_id)
                    snaps = {s["name"]: s for s in image.list_snaps()}
                size = snaps[backend_id]["size"]
                stamp = image.get_snap_timestamp(snaps[backend_id]["id"])
        created = stamp.replace(tzinfo=UTC) if isinstance(stamp, datetime) else datetime.now(UTC)
        return SnapshotInfo(backend_id, size, created.strftime("%Y-%m-%dT%H:%M:%SZ"))

    def _unprotect(self, image: Any, snap: str, attempts: int = 8) -> None:
        """Unprotect once no clone needs the snapshot.

        Flattening detaches a clone's head, but snapshots taken of the clone before that still
        read through this parent snapshot: then it stays until those are deleted, and the
        dock's retry removes it afterwards (a DriverError is a temporary failure).
        """
        for attempt in range(attempts):
            try:
                image.unprotect_snap(snap)
                return
            except self.rbd.ImageBusy as e:
                if attempt == attempts - 1:
                    raise DriverError(f"snapshot {snap} is still needed by snapshots of its clones; it goes "
                                      f"once they are deleted ({e})") from e
                time.sleep(0.25)

    def _remove_snap(self, ioctx: Any, image_name: str, snap: str) -> None:
        with self._image(ioctx, image_name) as image:
            if snap not in {s["name"] for s in image.list_snaps()}:
                return
            if image.is_protected_snap(snap):
                with self._image(ioctx, image_name, snapshot=snap) as at_snap:
                    children = [c["image"] for c in at_snap.list_children2()]
                for child in children:  # clones of this snapshot stop depending on it
                    with self._image(ioctx, child) as clone, contextlib.suppress(self.rbd.InvalidArgument):
                        clone.flatten()  # InvalidArgument: already independent
                self._unprotect(image, snap)
            image.remove_snap(snap)

    def delete_snapshot(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            try:
                parent = self._snapshot_parent(ioctx, backend_id)
            except NotFound:
                return
            with contextlib.suppress(NotFound):  # the image went first
                self._remove_snap(ioctx, parent, backend_id)
            self._index(ioctx, backend_id, None)

    def export(self, backend_id: str, pool: str, hosts: Sequence[str]) -> dict[str, str]:
        """krbd needs no target: the node maps the image itself (credentials from its Secret)."""
        monitors = self.cluster.conf_get("mon_host")
        return {"transport": "rbd", "pool": self.pool, "image": backend_id, "monitors": monitors}

    def list_objects(self, pool: str) -> list[str]:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            images = [n for n in self.rbd.RBD().list(ioctx) if n.startswith("vol-")]
            with self.rados.ReadOpCtx() as op:
                values, _ = ioctx.get_omap_vals(op, "", "", 100000)
                try:
                    ioctx.operate_read_op(op, SNAPSHOT_INDEX)
                    snaps = [k for k, _v in values]
                except self.rados.ObjectNotFound:
                    snaps = []
        return sorted(images + snaps)
