"""Ceph RBD driver over the rados/rbd Python bindings (Debian's, made importable from the venv).

Volumes are images `vol-<uid>`, snapshots are RBD snapshots `snap-<uid>` of their volume's
image. A small omap object (`opensds.snapshots`) maps each snapshot to its image and owner, so
a restore finds its parent with one read instead of scanning every image (as ceph-csi keeps
its journal in omaps). Clones are layered on a protected snapshot and flattened once the
parent chain reaches `cloneDepth`, so deep chains never slow reads down. Profile QoS becomes
librbd's `rbd_qos_iops_limit` / `rbd_qos_bps_limit` image metadata.

Owner tags: a volume's owner is the image metadata key `opensds.owner` (JSON), set right after
the image is made (a retry sets it when it is missing); a snapshot's owner is in its index
entry, written before the snapshot is taken. A clone inherits its parent's metadata, so a
tag naming another object's UID than the image's own name is no tag at all. The sweep's
quarantine is RBD's trash for images (`rbd trash mv`, the deletion time is Ceph's own record)
and a rename to `quarantine-snap-<uid>` plus a time in the index for snapshots.

Every rados/rbd exception leaves this module as a DriverError (PermanentDriverError for
permissions and invalid arguments), never as a binding's own exception.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from ..scheduler import Capabilities
from .base import (
    BackendObject,
    DriverError,
    NotFound,
    Owner,
    PermanentDriverError,
    PoolStats,
    SnapshotInfo,
    Source,
    VolumeInfo,
)

log = logging.getLogger(__name__)
SNAPSHOT_INDEX = "opensds.snapshots"
CLONE_SOURCE_PREFIX = "clone-source-"
OWNER_KEY = "opensds.owner"
QUARANTINE_PREFIX = "quarantine-"

P = ParamSpec("P")
R = TypeVar("R")


def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as e:
        raise PermanentDriverError("the rados/rbd Python bindings are missing: apt-get install python3-rados "
                                   "python3-rbd, then `make venv` links them into the venv") from e
    return rados, rbd


def _translated(method: Callable[Concatenate[RbdDriver, P], R]) -> Callable[Concatenate[RbdDriver, P], R]:
    """A rados/rbd exception becomes a DriverError naming the operation (permanent when retrying cannot help)."""

    @functools.wraps(method)
    def wrapper(self: RbdDriver, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except DriverError:
            raise
        except (self.rados.Error, self.rbd.Error) as e:
            permanent = (self.rbd.PermissionError, self.rbd.InvalidArgument, self.rados.PermissionError,
                         self.rados.PermissionDeniedError, self.rados.InvalidArgumentError)
            kind = PermanentDriverError if isinstance(e, permanent) else DriverError
            raise kind(f"ceph {method.__name__.strip('_')} on pool {self.pool} failed: {e}") from e

    return cast("Callable[Concatenate[RbdDriver, P], R]", wrapper)


def parse_owner(backend_id: str, raw: str | bytes | None) -> Owner | None:
    """The owner in a tag (see Owner.from_json). A clone inherits its parent image's metadata:
    until the clone's own tag is written (right after the clone), the inherited tag names the
    parent's UID, which is not this object's, so it reads as no owner."""
    return Owner.from_json(backend_id, raw)


def _owner_json(owner: Owner) -> str:
    return owner.to_json()


def parse_index_entry(raw: bytes) -> dict[str, Any]:
    """A snapshot index value: {"image", "owner", "quarantinedAt"}; older releases stored the image name only."""
    text = bytes(raw).decode()
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("image"), str):
            return entry
    return {"image": text}


class RbdDriver:
    name = "ceph"
    native_protocol = "rbd"  # krbd maps images itself: no target

    def __init__(self, conf: str, pool: str, user: str, keyring: str | None = None, key: str | None = None,
                 clone_depth: int = 8, connect_timeout: int = 10, op_timeout: int = 60,
                 trash_delay_seconds: int = 0) -> None:
        self.rados, self.rbd = _bindings()
        self.pool = pool
        self.clone_depth = clone_depth
        # Ceph's own guard on the trash: `rbd trash purge` by an admin leaves entries younger than this.
        self.trash_delay_seconds = trash_delay_seconds
        options = {"key": key} if key else ({"keyring": keyring} if keyring else {})
        # Without these a call to an unreachable OSD or monitor blocks forever (and the dock with it).
        options |= {"rados_osd_op_timeout": str(op_timeout), "rados_mon_op_timeout": str(op_timeout)}
        try:
            self.cluster = self.rados.Rados(conffile=conf, rados_id=user, conf=options)
            self.cluster.connect(timeout=connect_timeout)
        except self.rados.Error as e:
            raise DriverError(f"cannot connect to Ceph as client.{user}: {e}") from e

    def _check_pool(self, pool: str) -> None:
        if pool != self.pool:
            raise PermanentDriverError(f"unknown pool {pool!r} (this backend serves {self.pool!r})")

    @contextmanager
    def _ioctx(self) -> Iterator[Any]:
        try:
            ioctx = self.cluster.open_ioctx(self.pool)
        except self.rados.ObjectNotFound as e:
            raise PermanentDriverError(f"Ceph pool {self.pool!r} does not exist") from e
        try:
            yield ioctx
        finally:
            ioctx.close()

    @contextmanager
    def _image(self, ioctx: Any, name: str, snapshot: str | None = None, image_id: str | None = None) -> Iterator[Any]:
        try:
            if image_id is not None:
                image = self.rbd.Image(ioctx, image_id=image_id, snapshot=snapshot)
            else:
                image = self.rbd.Image(ioctx, name, snapshot=snapshot)
        except self.rbd.ImageNotFound as e:
            raise NotFound(f"image {self.pool}/{name} not found") from e
        try:
            yield image
        finally:
            image.close()

    def _trashed(self, ioctx: Any, name: str) -> list[dict[str, Any]]:
        """Trash entries of images that had this name, newest first."""
        entries = [e for e in self.rbd.RBD().trash_list(ioctx) if e["name"] == name]
        return sorted(entries, key=lambda e: e["deletion_time"], reverse=True)

    def _any_image(self, ioctx: Any, name: str) -> AbstractContextManager[Any]:
        """The live image of this name, else the newest one in the trash (a quarantined volume)."""
        if name in self.rbd.RBD().list(ioctx):
            return self._image(ioctx, name)
        trashed = self._trashed(ioctx, name)
        if not trashed:
            raise NotFound(f"image {self.pool}/{name} not found")
        return self._image(ioctx, name, image_id=trashed[0]["id"])

    # ------------------------------------------------------------ capacity

    @_translated
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
                    with contextlib.suppress(NotFound), self._image(ioctx, name) as image:  # removed meanwhile
                        provisioned += image.size()
        used, free = int(stats["stored"]), int(stats["max_avail"])
        return [PoolStats(self.pool, used + free, free, provisioned, Capabilities(
            storage_types=frozenset({"block"}), thin=True, thick=False, snapshot=True, clone=True,
            multi_attach=True, protocols=frozenset({"rbd"}), custom={}, max_volume_bytes=0))]

    # ------------------------------------------------------------ volumes

    @_translated
    def get_volume(self, backend_id: str, pool: str) -> VolumeInfo | None:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            try:
                with self._image(ioctx, backend_id) as image:
                    size = image.size()
            except NotFound:
                return None
        return VolumeInfo(backend_id, size, size, "")

    def _tag(self, image: Any, backend_id: str, owner: Owner | None, adopt_only: bool = False) -> None:
        """Write the owner tag; with adopt_only, only onto an image without a valid tag of its own."""
        if owner is None:
            return
        if adopt_only:
            try:
                current = image.metadata_get(OWNER_KEY)
            except KeyError:
                current = None
            if parse_owner(backend_id, current) is not None:
                return
        image.metadata_set(OWNER_KEY, _owner_json(owner))

    @_translated
    def create_volume(self, backend_id: str, pool: str, size_bytes: int, thin: bool,
                      source: Source | None = None, owner: Owner | None = None) -> VolumeInfo:
        self._check_pool(pool)
        if not thin:
            raise PermanentDriverError("RBD images are always thin; use a thin profile")
        with self._ioctx() as ioctx:
            try:
                with self._image(ioctx, backend_id) as image:
                    self._tag(image, backend_id, owner, adopt_only=True)  # a retry after a crash before the tag
                    size = image.size()
                return VolumeInfo(backend_id, size, size, "")
            except NotFound:
                pass
            if self._trashed(ioctx, backend_id):
                raise PermanentDriverError(
                    f"{backend_id} is in quarantine (the pool's RBD trash): `rbd trash restore` it, or let the sweep "
                    f"purge it, before it is created again")
            if source is None:
                self.rbd.RBD().create(ioctx, backend_id, size_bytes, old_format=False,
                                      features=self.rbd.RBD_FEATURE_LAYERING)
                with self._image(ioctx, backend_id) as image:
                    self._tag(image, backend_id, owner)
            elif source.kind == "Snapshot":
                parent = self._snapshot_parent(ioctx, source.backend_id)
                self._clone(ioctx, parent, source.backend_id, backend_id, owner)
            else:
                snap = CLONE_SOURCE_PREFIX + backend_id
                with self._image(ioctx, source.backend_id) as image:
                    if snap not in {s["name"] for s in image.list_snaps()}:
                        image.create_snap(snap)
                self._clone(ioctx, source.backend_id, snap, backend_id, owner, flatten=True)
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

    def _clone(self, ioctx: Any, parent: str, snap: str, child: str, owner: Owner | None,
               flatten: bool = False) -> None:
        with self._image(ioctx, parent) as image:
            if not image.is_protected_snap(snap):
                image.protect_snap(snap)
        self.rbd.RBD().clone(ioctx, parent, snap, ioctx, child, features=self.rbd.RBD_FEATURE_LAYERING)
        with self._image(ioctx, child) as image:
            self._tag(image, child, owner)  # replaces the tag the clone inherited from its parent
            if flatten or self._depth(ioctx, child) >= self.clone_depth:
                image.flatten()

    def _snap_names(self, image: Any) -> list[str]:
        return [s["name"] for s in image.list_snaps()]

    @_translated
    def delete_volume(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            try:
                with self._image(ioctx, backend_id) as image:
                    snaps = self._snap_names(image)
            except NotFound:
                return
            if any(s.startswith(("snap-", QUARANTINE_PREFIX)) for s in snaps):
                raise DriverError(f"{backend_id} still has snapshots {', '.join(snaps)}; they go first")
            for snap in snaps:  # leftovers of an interrupted clone
                self._remove_snap(ioctx, backend_id, snap)
            try:
                self.rbd.RBD().remove(ioctx, backend_id)
            except self.rbd.ImageNotFound:
                pass
            except self.rbd.ImageBusy as e:
                raise DriverError(f"{backend_id} is still mapped or open somewhere: {e}") from e

    @_translated
    def extend_volume(self, backend_id: str, pool: str, size_bytes: int) -> VolumeInfo:
        self._check_pool(pool)
        with self._ioctx() as ioctx, self._image(ioctx, backend_id) as image:
            if image.size() < size_bytes:
                image.resize(size_bytes)
            size = image.size()
        return VolumeInfo(backend_id, size, size, "")

    @_translated
    def set_qos(self, backend_id: str, max_iops: int | None, max_bps: int | None) -> None:
        """librbd QoS as image metadata (honoured by librbd clients; krbd ignores it)."""
        with self._ioctx() as ioctx, self._image(ioctx, backend_id) as image:
            for key, value in (("conf_rbd_qos_iops_limit", max_iops), ("conf_rbd_qos_bps_limit", max_bps)):
                if value:
                    image.metadata_set(key, str(value))

    # ------------------------------------------------------------ snapshots

    def _index_entries(self, ioctx: Any, keys: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        with self.rados.ReadOpCtx() as op:
            if keys is None:
                values, _ = ioctx.get_omap_vals(op, "", "", 100000)
            else:
                values, _ = ioctx.get_omap_vals_by_keys(op, tuple(keys))
            try:
                ioctx.operate_read_op(op, SNAPSHOT_INDEX)
            except self.rados.ObjectNotFound:
                return {}
            return {k: parse_index_entry(v) for k, v in values}

    def _entry(self, ioctx: Any, snap_id: str) -> dict[str, Any] | None:
        return self._index_entries(ioctx, (snap_id,)).get(snap_id)

    def _snapshot_parent(self, ioctx: Any, snap_id: str) -> str:
        entry = self._entry(ioctx, snap_id)
        if entry is None or entry.get("quarantinedAt") is not None:
            raise NotFound(f"snapshot {snap_id} not found")
        return str(entry["image"])

    def _index(self, ioctx: Any, snap_id: str, entry: dict[str, Any] | None) -> None:
        with self.rados.WriteOpCtx() as op:
            if entry is None:
                ioctx.remove_omap_keys(op, (snap_id,))
            else:
                ioctx.set_omap(op, (snap_id,), (json.dumps(entry, sort_keys=True).encode(),))
            ioctx.operate_write_op(op, SNAPSHOT_INDEX)

    @_translated
    def create_snapshot(self, backend_id: str, pool: str, volume_id: str,
                        owner: Owner | None = None) -> SnapshotInfo:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            entry = self._entry(ioctx, backend_id)
            if entry is not None and entry.get("quarantinedAt") is not None:
                raise PermanentDriverError(f"snapshot {backend_id} is in quarantine; it is not taken again")
            new: dict[str, Any] = {"image": volume_id}
            known = parse_owner(backend_id, json.dumps(entry["owner"])) if entry and "owner" in entry else None
            if known is not None:
                new["owner"] = known.to_dict()  # a retry never overwrites the tag (or its Retain mark)
            elif owner is not None:
                new["owner"] = owner.to_dict()
            if new != entry:
                self._index(ioctx, backend_id, new)  # intent and owner first: the sweep can find it
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
        """Remove a snapshot of an image (live or in the trash), flattening clones that read through it."""
        with self._any_image(ioctx, image_name) as image:
            if snap not in self._snap_names(image):
                return
            if image.is_protected_snap(snap):
                with self._image(ioctx, image_name, snapshot=snap, image_id=image.id()) as at_snap:
                    children = list(at_snap.list_children2())
                for child in children:  # clones of this snapshot stop depending on it
                    with self._image(ioctx, child["image"], image_id=child["id"]) as clone, \
                            contextlib.suppress(self.rbd.InvalidArgument):
                        clone.flatten()  # InvalidArgument: already independent
                self._unprotect(image, snap)
            image.remove_snap(snap)

    @_translated
    def delete_snapshot(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            entry = self._entry(ioctx, backend_id)
            if entry is None or entry.get("quarantinedAt") is not None:
                return  # gone, or quarantined: only purge removes that
            with contextlib.suppress(NotFound):  # the image went first
                self._remove_snap(ioctx, entry["image"], backend_id)
            self._index(ioctx, backend_id, None)

    @_translated
    def export(self, backend_id: str, pool: str, hosts: Sequence[str]) -> dict[str, str]:
        """krbd needs no target: the node maps the image itself (credentials from its Secret)."""
        monitors = self.cluster.conf_get("mon_host")
        return {"transport": "rbd", "pool": self.pool, "image": backend_id, "monitors": monitors}

    # ------------------------------------------------------------ sweep

    @_translated
    def list_objects(self, pool: str) -> list[str]:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            names = set(self.rbd.RBD().list(ioctx))
            images = [n for n in names if n.startswith("vol-")]
            # A snapshot exists when its image holds it, not when the index names it: an entry whose
            # snapshot was removed behind our back (or never taken) must read as missing to the dock.
            wanted: dict[str, list[str]] = {}
            for snap_id, entry in self._index_entries(ioctx).items():
                if entry.get("quarantinedAt") is None and entry["image"] in names:
                    wanted.setdefault(entry["image"], []).append(snap_id)
            snaps: list[str] = []
            for image_name, snap_ids in wanted.items():
                with contextlib.suppress(NotFound), self._image(ioctx, image_name) as image:  # removed meanwhile
                    present = set(self._snap_names(image))
                    snaps += [s for s in snap_ids if s in present]
        return sorted(images + snaps)

    def _image_owner(self, ioctx: Any, name: str, image_id: str | None = None) -> Owner | None:
        try:
            with self._image(ioctx, name, image_id=image_id) as image:
                try:
                    return parse_owner(name, image.metadata_get(OWNER_KEY))
                except KeyError:
                    return None
        except NotFound:
            return None

    @_translated
    def scan(self, pool: str) -> list[BackendObject]:
        """Snapshots first (the sweep quarantines and purges them before their volumes), then volumes."""
        self._check_pool(pool)
        found: list[BackendObject] = []
        with self._ioctx() as ioctx:
            for snap_id, entry in sorted(self._index_entries(ioctx).items()):
                owner = parse_owner(snap_id, json.dumps(entry["owner"])) if "owner" in entry else None
                found.append(BackendObject(snap_id, owner, entry.get("quarantinedAt")))
            live = sorted(n for n in self.rbd.RBD().list(ioctx) if n.startswith("vol-"))
            for name in live:
                found.append(BackendObject(name, self._image_owner(ioctx, name)))
            newest: dict[str, dict[str, Any]] = {}
            for e in self.rbd.RBD().trash_list(ioctx):
                if e["name"].startswith("vol-") and (
                        e["name"] not in newest or e["deletion_time"] > newest[e["name"]]["deletion_time"]):
                    newest[e["name"]] = e
            for name, e in sorted(newest.items()):
                stamp = e["deletion_time"]
                when = (stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp).timestamp()
                found.append(BackendObject(name, self._image_owner(ioctx, name, e["id"]), when))
        return found

    @_translated
    def set_owner(self, backend_id: str, pool: str, owner: Owner) -> None:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            entry = self._entry(ioctx, backend_id)
            if entry is not None:
                self._index(ioctx, backend_id, entry | {"owner": owner.to_dict()})
                return
            with self._any_image(ioctx, backend_id) as image:
                image.metadata_set(OWNER_KEY, _owner_json(owner))

    @_translated
    def quarantine(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            entry = self._entry(ioctx, backend_id)
            if entry is not None:
                self._quarantine_snapshot(ioctx, backend_id, entry)
            elif backend_id in self.rbd.RBD().list(ioctx):
                self._quarantine_image(ioctx, backend_id)

    def _quarantine_snapshot(self, ioctx: Any, snap_id: str, entry: dict[str, Any]) -> None:
        """Time into the index first, then the rename (a retry completes it)."""
        if entry.get("quarantinedAt") is None:
            self._index(ioctx, snap_id, entry | {"quarantinedAt": time.time()})
        with contextlib.suppress(NotFound), self._any_image(ioctx, entry["image"]) as image:
            names = self._snap_names(image)
            if snap_id in names and QUARANTINE_PREFIX + snap_id not in names:
                image.rename_snap(snap_id, QUARANTINE_PREFIX + snap_id)

    def _quarantine_image(self, ioctx: Any, name: str) -> None:
        """Into the trash, unless a snapshot of it is still live (restores read from it)."""
        live_snaps = [k for k, e in self._index_entries(ioctx).items()
                      if e["image"] == name and e.get("quarantinedAt") is None]
        with self._image(ioctx, name) as image:
            snaps = self._snap_names(image)
        live_snaps += [s for s in snaps if s.startswith("snap-") and s not in live_snaps]
        if live_snaps:
            raise DriverError(f"{name} is not quarantined: its snapshots {', '.join(sorted(live_snaps))} are live")
        for snap in snaps:
            if snap.startswith(CLONE_SOURCE_PREFIX):  # leftovers of an interrupted clone
                self._remove_snap(ioctx, name, snap)
        try:
            self.rbd.RBD().trash_move(ioctx, name, self.trash_delay_seconds)
        except self.rbd.ImageNotFound:
            pass
        except self.rbd.ImageBusy as e:
            raise DriverError(f"{name} is still mapped or open somewhere: {e}") from e

    @_translated
    def purge(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        with self._ioctx() as ioctx:
            entry = self._entry(ioctx, backend_id)
            if entry is not None:
                if entry.get("quarantinedAt") is None:
                    return  # live: never purged
                with contextlib.suppress(NotFound):  # its image went first
                    for name in (QUARANTINE_PREFIX + backend_id, backend_id):
                        self._remove_snap(ioctx, entry["image"], name)
                self._index(ioctx, backend_id, None)
                return
            for e in self._trashed(ioctx, backend_id):
                with self._image(ioctx, backend_id, image_id=e["id"]) as image:
                    snaps = self._snap_names(image)
                if snaps:
                    raise DriverError(f"{backend_id} in the trash still has snapshots {', '.join(snaps)}; "
                                      f"they are purged first")
                with contextlib.suppress(self.rbd.ImageNotFound):  # the dock's quarantine period is over
                    self.rbd.RBD().trash_remove(ioctx, e["id"], force=True)
