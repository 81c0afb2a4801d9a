"""Data safety with the real operator and dock on a Ceph RBD backend (issue 9, items 1 and 3).

Ceph runs on the host (hack/ceph.sh: one mon, mgr and OSD on 127.0.0.1, cephx on); the dock
only talks librados/librbd to it, so no VM is needed. The dock runs as the shipped
opensds-dock ServiceAccount and reads its cephx key from the StorageBackend's spec.secretRef.
Tests reach behind the dock's back with the rbd bindings (as client.opensds): rename an image,
remove a snapshot, leave stray images as a crash, another cluster or an admin would.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from opensds_operator.drivers.base import DriverError, Owner

from .conftest import Cluster, Processes, _exists, ceph_client_key, wait_for
from .helpers import CRs, condition, events_for

POOL = "opensds"
MiB = 2**20


@pytest.fixture(scope="module")
def ceph(ceph_cluster: Path) -> tuple[Path, str]:
    """(ceph.conf, client.opensds key) of the tests' own Ceph (conftest.ceph_cluster: .ceph-test)."""
    return ceph_cluster / "ceph.conf", ceph_client_key(ceph_cluster)


@dataclass
class RbdStack:
    backend: str
    profile: str
    dock: Processes  # only its "dock" entry is used: the operator is the session's
    driver: Any  # RbdDriver as client.opensds, for looking behind the dock's back

    def images(self) -> set[str]:
        with self.driver._ioctx() as ioctx:
            return set(self.driver.rbd.RBD().list(ioctx))

    def trashed(self) -> set[str]:
        with self.driver._ioctx() as ioctx:
            return {e["name"] for e in self.driver.rbd.RBD().trash_list(ioctx)}

    def digest(self, image: str, length: int) -> str:
        with self.driver._ioctx() as ioctx, self.driver._image(ioctx, image) as img:
            return hashlib.sha256(img.read(0, length)).hexdigest()

    def write(self, image: str, offset: int, data: bytes) -> None:
        with self.driver._ioctx() as ioctx, self.driver._image(ioctx, image) as img:
            img.write(data, offset)

    def rename(self, old: str, new: str) -> None:
        with self.driver._ioctx() as ioctx:
            self.driver.rbd.RBD().rename(ioctx, old, new)

    def restart_dock(self, *extra: str) -> None:
        self.dock.kill("dock")
        self.dock.dock_args = [*self.dock.dock_args[:2], *extra]  # keep --lock-dir
        self.dock.start("dock")


def _ready_backend(obj: dict[str, Any]) -> bool:
    c = condition(obj, "Ready")
    return bool(c and c["status"] == "True" and (obj.get("status") or {}).get("pools"))


@pytest.fixture
def rbd(cluster: Cluster, processes: Processes, ceph: tuple[Path, str],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[RbdStack]:
    """A ceph StorageBackend on pool `opensds` with its own real dock (the session's operator schedules)."""
    from opensds_operator.drivers.rbd import RbdDriver

    conf, key = ceph
    base = tmp_path_factory.mktemp("rbd-dock")
    tag = uuid.uuid4().hex[:6]
    backend, secret, profile = f"ceph-{tag}", f"cephx-{tag}", f"rbd-{tag}"
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_secret("opensds-system", client.V1Secret(
        metadata=client.V1ObjectMeta(name=secret), string_data={"key": key, "userID": "opensds", "userKey": key}))
    crs = CRs(cluster.api)
    crs.create("storagebackends", "StorageBackend", backend, {
        "driver": "ceph", "secretRef": {"name": secret, "namespace": "opensds-system"},
        "parameters": {"conf": str(conf), "pool": POOL, "user": "opensds"}})
    crs.create("storageprofiles", "StorageProfile", profile, {
        "storageType": "block", "accessProtocol": "rbd", "provisioning": {"type": "thin"},
        "nodeStageSecretRef": {"name": secret, "namespace": "opensds-system"}})
    dock = Processes(backend, base, {"dock": processes.kubeconfigs["dock"]})
    dock.dock_args = ["--lock-dir", str(base)]
    dock.start("dock")
    stack = RbdStack(backend, profile, dock, RbdDriver(str(conf), POOL, "opensds", key=key))
    try:
        wait_for(lambda: _ready_backend(crs.get("storagebackends", backend)), 90, "ceph backend Ready")
        yield stack
    finally:
        crs.delete_if_present("storageprofiles", profile)
        if _exists(crs.api, "storagebackends", backend):
            crs.delete("storagebackends", backend)
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: not _exists(crs.api, "storagebackends", backend), 60, f"{backend} deleted")
        dock.stop_all()
        core.delete_namespaced_secret(secret, "opensds-system")
        stack.driver.cluster.shutdown()
        print(f"ceph dock log in {base}")


def _pinned(stack: RbdStack, **extra: Any) -> dict[str, Any]:
    """Placed on this test's backend (a Ceph pool may be served by several backends)."""
    return {"size": "64Mi", "profile": stack.profile, "backend": stack.backend, "pool": POOL, **extra}


def _phase(crs: CRs, name: str) -> str | None:
    return (crs.get("volumes", name).get("status") or {}).get("phase")


def _missing(crs: CRs, plural: str, name: str) -> dict[str, Any] | None:
    c = condition(crs.get(plural, name), "Ready")
    return c if c and c["status"] == "False" and c["reason"] == "BackendObjectMissing" else None


def _cluster_id(cluster: Cluster) -> str:
    return str(client.CoreV1Api(cluster.api).read_namespace("kube-system").metadata.uid)


def test_renamed_image_is_reported_missing_and_never_recreated_empty(
        cluster: Cluster, rbd: RbdStack, namespace: str) -> None:
    crs = CRs(cluster.api, namespace)
    vol = crs.create("volumes", "Volume", "data", _pinned(rbd))
    wait_for(lambda: _phase(crs, "data") == "Available", 90, "Available")
    image = f"vol-{vol['metadata']['uid']}"
    assert image in rbd.images()
    rbd.write(image, 5 * MiB, os.urandom(2 * MiB))
    original = rbd.digest(image, 64 * MiB)

    aside = f"aside-{vol['metadata']['uid']}"  # as a wrong pool edit or an admin's rename would hide it
    rbd.dock.kill("dock")
    rbd.rename(image, aside)
    rbd.dock.start("dock")
    ready = wait_for(lambda: _missing(crs, "volumes", "data"), 60, "BackendObjectMissing")
    assert "not re-created" in ready["message"]  # type: ignore[index]
    status = crs.get("volumes", "data")["status"]
    assert status["code"] == "BackendObjectMissing"
    wait_for(lambda: any(e.startswith("BackendObjectMissing") for e in events_for(cluster.api, namespace, "data")),
             30, "the Warning Event")
    time.sleep(3)  # give a wrong dock every chance to make a blank one
    assert image not in rbd.images() and image not in rbd.trashed(), "the dock made a blank image in its place"
    assert aside in rbd.images()

    rbd.rename(aside, image)  # the data is back
    rbd.restart_dock()
    wait_for(lambda: _phase(crs, "data") == "Available", 60, "Available again")
    assert crs.get("volumes", "data")["status"].get("code") is None
    assert rbd.digest(image, 64 * MiB) == original
    crs.delete("volumes", "data")
    wait_for(lambda: not crs.exists("volumes", "data"), 60, "deleted")
    assert image not in rbd.images()


def test_ready_snapshot_removed_behind_the_docks_back_is_not_taken_again(
        cluster: Cluster, rbd: RbdStack, namespace: str) -> None:
    crs = CRs(cluster.api, namespace)
    vol = crs.create("volumes", "Volume", "src", _pinned(rbd))
    wait_for(lambda: _phase(crs, "src") == "Available", 90, "Available")
    image = f"vol-{vol['metadata']['uid']}"
    rbd.write(image, 0, b"before" * 1000)
    snap = crs.create("snapshots", "Snapshot", "snap", {"volumeName": "src"})
    wait_for(lambda: (crs.get("snapshots", "snap").get("status") or {}).get("readyToUse"), 90, "Snapshot ready")
    snap_id = f"snap-{snap['metadata']['uid']}"

    def snaps() -> list[str]:
        with rbd.driver._ioctx() as ioctx, rbd.driver._image(ioctx, image) as img:
            return [s["name"] for s in img.list_snaps()]

    assert snap_id in snaps()
    rbd.write(image, 0, b"after!" * 1000)  # a snapshot taken now would hold other data
    rbd.dock.kill("dock")
    with rbd.driver._ioctx() as ioctx, rbd.driver._image(ioctx, image) as img:
        img.remove_snap(snap_id)  # `rbd snap rm` by hand
    rbd.dock.start("dock")
    ready = wait_for(lambda: _missing(crs, "snapshots", "snap"), 60, "Snapshot BackendObjectMissing")
    assert snap_id in ready["message"]  # type: ignore[index]
    assert crs.get("snapshots", "snap")["status"]["code"] == "BackendObjectMissing"
    wait_for(lambda: any(e.startswith("BackendObjectMissing") for e in events_for(cluster.api, namespace, "snap")),
             30, "the Warning Event")
    time.sleep(3)
    assert snap_id not in snaps(), "the dock took the snapshot again (of different data)"

    crs.delete("snapshots", "snap")
    wait_for(lambda: not crs.exists("snapshots", "snap"), 60, "Snapshot deleted")
    crs.delete("volumes", "src")
    wait_for(lambda: not crs.exists("volumes", "src"), 60, "Volume deleted")
    assert image not in rbd.images()
    assert snap_id not in rbd.driver.list_objects(POOL)


def test_sweep_trashes_only_its_own_orphans_purges_them_later_and_keeps_retained_images(
        cluster: Cluster, rbd: RbdStack, namespace: str) -> None:
    crs = CRs(cluster.api, namespace)
    kept = crs.create("volumes", "Volume", "kept", _pinned(rbd, reclaimPolicy="Retain"))
    wait_for(lambda: _phase(crs, "kept") == "Available", 90, "Available")
    kept_id = f"vol-{kept['metadata']['uid']}"
    rbd.write(kept_id, 0, b"retained" * 1000)
    kept_digest = rbd.digest(kept_id, 64 * MiB)
    crs.delete("volumes", "kept")
    wait_for(lambda: not crs.exists("volumes", "kept"), 60, "retained Volume CR deleted")
    assert kept_id in rbd.images()
    owner = next(o.owner for o in rbd.driver.scan(POOL) if o.backend_id == kept_id)
    assert owner is not None and owner.retained, "the Retain record is not on the image"

    # Three strays as a crash, another cluster sharing the pool and an admin would leave them.
    ours, theirs, untagged = (f"vol-{uuid.uuid4()}" for _ in range(3))
    rbd.driver.create_volume(ours, POOL, 4 * MiB, True, owner=Owner(
        _cluster_id(cluster), rbd.backend, "Volume", namespace, "lost", ours[4:]))
    rbd.driver.create_volume(theirs, POOL, 4 * MiB, True, owner=Owner(
        str(uuid.uuid4()), rbd.backend, "Volume", namespace, "x", theirs[4:]))
    rbd.driver.create_volume(untagged, POOL, 4 * MiB, True)
    rbd.write(theirs, 0, b"theirs" * 1000)
    theirs_digest = rbd.digest(theirs, 4 * MiB)
    try:
        started = time.monotonic()
        rbd.restart_dock("--quarantine-hours", "0.002", "--orphan-interval", "3")
        wait_for(lambda: ours in rbd.trashed(), 60, "our orphan moved to the RBD trash")
        quarantined = time.monotonic() - started
        assert ours not in rbd.images()
        assert any(o.backend_id == ours and o.quarantined_at for o in rbd.driver.scan(POOL)), "not kept aside"
        # The backend is cluster-scoped: its Events land in "default".
        wait_for(lambda: any(e.startswith("OrphanQuarantined") and ours in e
                             for e in events_for(cluster.api, "default", rbd.backend)), 30, "OrphanQuarantined")
        wait_for(lambda: ours not in rbd.trashed() | rbd.images(), 60, "quarantine purged")
        purged = time.monotonic() - started
        assert purged - quarantined >= 0.002 * 3600 - 1, "purged before the quarantine period was over"
        wait_for(lambda: any(e.startswith("OrphanPurged") and ours in e
                             for e in events_for(cluster.api, "default", rbd.backend)), 30, "OrphanPurged")
        time.sleep(4)  # one more sweep
        assert {kept_id, theirs, untagged} <= rbd.images(), "the sweep touched what it cannot prove is its garbage"
        assert not {kept_id, theirs, untagged} & rbd.trashed()
        assert rbd.digest(theirs, 4 * MiB) == theirs_digest
        assert crs.get("storagebackends", rbd.backend)["status"]["foreignObjects"] >= 2

        # The Retain record outlives the StorageBackend CR: deleting it (and its dock) keeps the image.
        crs.delete("storagebackends", rbd.backend)
        wait_for(lambda: not crs.exists("storagebackends", rbd.backend), 60, "StorageBackend deleted")
        rbd.dock.stop_all()
        assert kept_id in rbd.images() and rbd.digest(kept_id, 64 * MiB) == kept_digest
        print(f"quarantined after {quarantined:.1f} s, purged after {purged:.1f} s")
    finally:
        for image in (kept_id, theirs, untagged, ours):
            with contextlib.suppress(DriverError):
                rbd.driver.delete_volume(image, POOL)
            with contextlib.suppress(DriverError):
                rbd.driver.purge(image, POOL)
    assert not {kept_id, theirs, untagged, ours} & (rbd.images() | rbd.trashed())
