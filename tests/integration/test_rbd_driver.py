"""The Ceph RBD driver against a real single-node Ceph cluster (hack/ceph.sh, cephx on).

The driver connects as client.opensds, whose caps are limited to the `opensds` pool.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from opensds_operator.drivers.base import BackendObject, DriverError, NotFound, Owner, PermanentDriverError, Source

MiB = 2**20


@pytest.fixture(scope="module")
def ceph(ceph_cluster: Path) -> Path:
    """The tests' own Ceph (conftest.ceph_cluster: .ceph-test, not `make up`'s .ceph)."""
    return ceph_cluster


@pytest.fixture
def driver(ceph: Path):  # type: ignore[no-untyped-def]
    from opensds_operator.drivers.rbd import RbdDriver

    key = next(line.split("=", 1)[1].strip() for line in (ceph / "client.opensds.keyring").read_text().splitlines()
               if line.strip().startswith("key"))
    d = RbdDriver(str(ceph / "ceph.conf"), "opensds", "opensds", key=key, clone_depth=2)
    yield d
    # Dependencies (snapshots of clones hold their parent's snapshot) resolve over passes,
    # as the dock's retries would; what a test left in quarantine is purged.
    for _ in range(6):
        for obj in d.scan("opensds"):
            if obj.quarantined_at is not None:
                with contextlib.suppress(DriverError):
                    d.purge(obj.backend_id, "opensds")
        for name in d.list_objects("opensds"):
            with contextlib.suppress(DriverError):
                (d.delete_snapshot if name.startswith("snap-") else d.delete_volume)(name, "opensds")
        if not d.scan("opensds"):
            break
    assert d.list_objects("opensds") == [] and d.scan("opensds") == []


def ids() -> str:
    return str(uuid.uuid4())


def write(driver, image: str, offset: int, data: bytes) -> None:  # type: ignore[no-untyped-def]
    with driver._ioctx() as ioctx, driver._image(ioctx, image) as img:
        img.write(data, offset)


def digest(driver, image: str, length: int) -> str:  # type: ignore[no-untyped-def]
    with driver._ioctx() as ioctx, driver._image(ioctx, image) as img:
        return hashlib.sha256(img.read(0, length)).hexdigest()


def test_pool_capacity_comes_from_cluster_stats(driver) -> None:  # type: ignore[no-untyped-def]
    (pool,) = driver.pools()
    assert pool.name == "opensds" and pool.total_bytes > pool.free_bytes > 0
    assert pool.capabilities.protocols == frozenset({"rbd"}) and pool.capabilities.thin


def test_volume_lifecycle_is_idempotent_and_keeps_data(driver) -> None:  # type: ignore[no-untyped-def]
    vol = f"vol-{ids()}"
    info = driver.create_volume(vol, "opensds", 64 * MiB, thin=True)
    assert info.size_bytes == 64 * MiB
    assert driver.create_volume(vol, "opensds", 64 * MiB, thin=True).size_bytes == 64 * MiB  # retry finds it
    write(driver, vol, 3 * MiB, b"opensds" * 1000)
    assert driver.extend_volume(vol, "opensds", 128 * MiB).size_bytes == 128 * MiB
    assert driver.get_volume(vol, "opensds").size_bytes == 128 * MiB  # type: ignore[union-attr]
    assert vol in driver.list_objects("opensds")
    driver.delete_volume(vol, "opensds")
    driver.delete_volume(vol, "opensds")  # already gone: fine
    assert driver.get_volume(vol, "opensds") is None


def test_snapshot_restore_and_clone_have_identical_data(driver) -> None:  # type: ignore[no-untyped-def]
    vol, snap, restored, cloned = f"vol-{ids()}", f"snap-{ids()}", f"vol-{ids()}", f"vol-{ids()}"
    driver.create_volume(vol, "opensds", 64 * MiB, thin=True)
    write(driver, vol, 0, os.urandom(2 * MiB))
    original = digest(driver, vol, 64 * MiB)
    info = driver.create_snapshot(snap, "opensds", vol)
    assert info.size_bytes == 64 * MiB and info.created_at.endswith("Z")
    write(driver, vol, 0, b"\0" * MiB)  # the source changes after the snapshot
    driver.create_volume(restored, "opensds", 64 * MiB, thin=True, source=Source("Snapshot", snap))
    driver.create_volume(cloned, "opensds", 64 * MiB, thin=True, source=Source("Volume", restored))
    assert digest(driver, restored, 64 * MiB) == original == digest(driver, cloned, 64 * MiB)
    with pytest.raises(DriverError, match="snapshots"):
        driver.delete_volume(vol, "opensds")  # snapshots go first
    driver.delete_snapshot(snap, "opensds")  # flattens the restored clone, then removes the snapshot
    driver.delete_snapshot(snap, "opensds")
    assert digest(driver, restored, 64 * MiB) == original
    for v in (cloned, restored, vol):
        driver.delete_volume(v, "opensds")
    assert driver.list_objects("opensds") == []


def test_clone_chains_are_flattened_at_the_depth_limit(driver) -> None:  # type: ignore[no-untyped-def]
    chain = [f"vol-{ids()}"]
    driver.create_volume(chain[0], "opensds", 16 * MiB, thin=True)
    snaps = []
    for _ in range(3):
        snap, child = f"snap-{ids()}", f"vol-{ids()}"
        driver.create_snapshot(snap, "opensds", chain[-1])
        driver.create_volume(child, "opensds", 16 * MiB, thin=True, source=Source("Snapshot", snap))
        snaps.append(snap)
        chain.append(child)
    with driver._ioctx() as ioctx:
        depths = [driver._depth(ioctx, name) for name in chain]
    assert max(depths) < 2, depths  # clone_depth=2: the second level is flattened
    # the first snapshot is still read through by the second (taken of a clone): it waits
    with pytest.raises(DriverError, match="still needed"):
        driver.delete_snapshot(snaps[0], "opensds")
    for snap in reversed(snaps):  # newest first, as dependencies allow
        driver.delete_snapshot(snap, "opensds")
    assert not [n for n in driver.list_objects("opensds") if n.startswith("snap-")]


def test_missing_sources_and_thick_requests_are_refused(driver) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFound):
        driver.create_volume(f"vol-{ids()}", "opensds", MiB, thin=True, source=Source("Snapshot", f"snap-{ids()}"))
    with pytest.raises(PermanentDriverError, match="thin"):
        driver.create_volume(f"vol-{ids()}", "opensds", MiB, thin=False)
    with pytest.raises(PermanentDriverError, match="unknown pool"):
        driver.get_volume("vol-x", "other")


def test_qos_limits_become_image_metadata(driver) -> None:  # type: ignore[no-untyped-def]
    vol = f"vol-{ids()}"
    driver.create_volume(vol, "opensds", 16 * MiB, thin=True)
    driver.set_qos(vol, 500, 10 * MiB)
    with driver._ioctx() as ioctx, driver._image(ioctx, vol) as img:
        meta = dict(img.metadata_list())
    assert meta["conf_rbd_qos_iops_limit"] == "500" and meta["conf_rbd_qos_bps_limit"] == str(10 * MiB)
    driver.delete_volume(vol, "opensds")


def owner_of(backend_id: str, retained: bool = False) -> Owner:
    kind = "Snapshot" if backend_id.startswith("snap-") else "Volume"
    return Owner("cluster-a", "ceph-a", kind, "ns", f"n-{backend_id[-6:]}", backend_id.split("-", 1)[1], retained)


def scanned(driver) -> dict[str, BackendObject]:  # type: ignore[no-untyped-def]
    return {o.backend_id: o for o in driver.scan("opensds")}


def test_volumes_clones_and_snapshots_carry_their_own_owner_tags(driver) -> None:  # type: ignore[no-untyped-def]
    """Old code wrote no owner anywhere: the sweep could only guess from CR UIDs."""
    vol, snap, restored, cloned = f"vol-{ids()}", f"snap-{ids()}", f"vol-{ids()}", f"vol-{ids()}"
    driver.create_volume(vol, "opensds", 16 * MiB, thin=True, owner=owner_of(vol))
    driver.create_snapshot(snap, "opensds", vol, owner=owner_of(snap))
    driver.create_volume(restored, "opensds", 16 * MiB, thin=True, source=Source("Snapshot", snap),
                         owner=owner_of(restored))
    driver.create_volume(cloned, "opensds", 16 * MiB, thin=True, source=Source("Volume", vol), owner=owner_of(cloned))
    found = scanned(driver)
    for backend_id in (vol, snap, restored, cloned):  # clones replace the tag they inherit from their parent
        assert found[backend_id] == BackendObject(backend_id, owner_of(backend_id)), backend_id
    with driver._ioctx() as ioctx, driver._image(ioctx, vol) as img:
        assert json.loads(img.metadata_get("opensds.owner"))["uid"] == vol.split("-", 1)[1]


def test_an_image_made_before_a_crash_is_tagged_by_the_retry_and_an_inherited_tag_is_no_tag(driver) -> None:  # type: ignore[no-untyped-def]
    parent, snap, child, bare = f"vol-{ids()}", f"snap-{ids()}", f"vol-{ids()}", f"vol-{ids()}"
    driver.create_volume(parent, "opensds", 8 * MiB, thin=True, owner=owner_of(parent))
    driver.create_snapshot(snap, "opensds", parent, owner=owner_of(snap))
    with driver._ioctx() as ioctx:  # the dock dies right after the clone / the create, before the tag
        with driver._image(ioctx, parent) as img:
            img.protect_snap(snap)
        driver.rbd.RBD().clone(ioctx, parent, snap, ioctx, child, features=driver.rbd.RBD_FEATURE_LAYERING)
        driver.rbd.RBD().create(ioctx, bare, 8 * MiB, old_format=False, features=driver.rbd.RBD_FEATURE_LAYERING)
    found = scanned(driver)
    # the clone carries its parent's metadata: that tag names the parent, so it is no owner at all
    assert found[child].owner is None and found[bare].owner is None
    driver.create_volume(child, "opensds", 8 * MiB, thin=True, source=Source("Snapshot", snap), owner=owner_of(child))
    driver.create_volume(bare, "opensds", 8 * MiB, thin=True, owner=owner_of(bare))
    driver.create_volume(parent, "opensds", 8 * MiB, thin=True, owner=owner_of(child))  # never re-tags an owned one
    found = scanned(driver)
    assert (found[child].owner, found[bare].owner, found[parent].owner) == (
        owner_of(child), owner_of(bare), owner_of(parent))


def test_retain_is_recorded_on_the_image_and_in_the_snapshot_index(driver) -> None:  # type: ignore[no-untyped-def]
    vol, snap = f"vol-{ids()}", f"snap-{ids()}"
    driver.create_volume(vol, "opensds", 8 * MiB, thin=True, owner=owner_of(vol))
    driver.create_snapshot(snap, "opensds", vol, owner=owner_of(snap))
    driver.set_owner(vol, "opensds", owner_of(vol, retained=True))
    driver.set_owner(snap, "opensds", owner_of(snap, retained=True))
    driver.create_snapshot(snap, "opensds", vol, owner=owner_of(snap))  # a retry keeps the mark
    found = scanned(driver)
    assert found[vol].owner == owner_of(vol, retained=True) and found[snap].owner == owner_of(snap, retained=True)
    with pytest.raises(NotFound):
        driver.set_owner(f"vol-{ids()}", "opensds", owner_of(vol))


def test_quarantine_trashes_images_renames_snapshots_and_purge_removes_them(driver) -> None:  # type: ignore[no-untyped-def]
    """Old code had no quarantine: an orphan was deleted at once."""
    vol, snap, restored = f"vol-{ids()}", f"snap-{ids()}", f"vol-{ids()}"
    driver.create_volume(vol, "opensds", 16 * MiB, thin=True, owner=owner_of(vol))
    write(driver, vol, 0, b"keep me" * 1000)
    original = digest(driver, vol, 16 * MiB)
    driver.create_snapshot(snap, "opensds", vol, owner=owner_of(snap))
    driver.create_volume(restored, "opensds", 16 * MiB, thin=True, source=Source("Snapshot", snap),
                         owner=owner_of(restored))
    with pytest.raises(DriverError, match="are live"):  # a restore could still need it
        driver.quarantine(vol, "opensds")
    before = time.time()
    driver.quarantine(snap, "opensds")
    driver.quarantine(snap, "opensds")  # idempotent
    assert snap not in driver.list_objects("opensds")
    with pytest.raises(NotFound):
        driver.create_volume(f"vol-{ids()}", "opensds", 16 * MiB, thin=True, source=Source("Snapshot", snap))
    driver.delete_snapshot(snap, "opensds")  # a delete never touches a quarantined snapshot
    driver.quarantine(vol, "opensds")
    driver.quarantine(vol, "opensds")
    assert vol not in driver.list_objects("opensds") and driver.get_volume(vol, "opensds") is None
    with pytest.raises(PermanentDriverError, match="in quarantine"):  # never re-made empty beside it
        driver.create_volume(vol, "opensds", 16 * MiB, thin=True, owner=owner_of(vol))
    with pytest.raises(PermanentDriverError, match="in quarantine"):
        driver.create_snapshot(snap, "opensds", restored, owner=owner_of(snap))
    with driver._ioctx() as ioctx:
        trash = [e for e in driver.rbd.RBD().trash_list(ioctx) if e["name"] == vol]
    assert len(trash) == 1
    found = scanned(driver)
    for backend_id in (vol, snap):
        stamp = found[backend_id].quarantined_at
        assert found[backend_id].owner == owner_of(backend_id)
        assert stamp is not None and before - 5 <= stamp <= time.time() + 5, (backend_id, stamp, before)
    assert found[restored].quarantined_at is None
    driver.set_owner(vol, "opensds", owner_of(vol, retained=True))  # a quarantined image can still be marked
    assert scanned(driver)[vol].owner == owner_of(vol, retained=True)
    assert digest(driver, restored, 16 * MiB) == original  # the restored clone still reads through
    with pytest.raises(DriverError, match="purged first"):
        driver.purge(vol, "opensds")  # its quarantined snapshot goes first
    driver.purge(restored, "opensds")  # live: purge never touches it
    driver.purge(snap, "opensds")  # flattens the live clone, then removes the snapshot
    driver.purge(snap, "opensds")
    driver.purge(vol, "opensds")
    driver.purge(vol, "opensds")
    assert digest(driver, restored, 16 * MiB) == original
    assert set(scanned(driver)) & {vol, snap} == set() and restored in driver.list_objects("opensds")
    with driver._ioctx() as ioctx:
        assert not [e for e in driver.rbd.RBD().trash_list(ioctx) if e["name"] == vol]


def test_snapshot_index_entries_of_older_releases_still_read(driver) -> None:  # type: ignore[no-untyped-def]
    vol, snap = f"vol-{ids()}", f"snap-{ids()}"
    driver.create_volume(vol, "opensds", 8 * MiB, thin=True, owner=owner_of(vol))
    with driver._ioctx() as ioctx:
        with driver.rados.WriteOpCtx() as op:  # the format before owner tags: the image name alone
            ioctx.set_omap(op, (snap,), (vol.encode(),))
            ioctx.operate_write_op(op, "opensds.snapshots")
        with driver._image(ioctx, vol) as img:
            img.create_snap(snap)
    assert scanned(driver)[snap] == BackendObject(snap, None)
    restored = f"vol-{ids()}"
    driver.create_volume(restored, "opensds", 8 * MiB, thin=True, source=Source("Snapshot", snap))
    driver.create_snapshot(snap, "opensds", vol, owner=owner_of(snap))  # a retry adopts it
    assert scanned(driver)[snap].owner == owner_of(snap)


def test_binding_errors_never_escape_as_rados_or_rbd_exceptions(ceph: Path) -> None:
    """Old code let rados.ObjectNotFound / rbd.* escape into the dock as unknown exceptions."""
    from opensds_operator.drivers.rbd import RbdDriver

    key = next(line.split("=", 1)[1].strip() for line in (ceph / "client.opensds.keyring").read_text().splitlines()
               if line.strip().startswith("key"))
    missing_pool = RbdDriver(str(ceph / "ceph.conf"), "no-such-pool", "opensds", key=key)
    with pytest.raises(PermanentDriverError, match="no-such-pool"):
        missing_pool.get_volume("vol-x", "no-such-pool")
    with pytest.raises(PermanentDriverError):
        missing_pool.list_objects("no-such-pool")
    d = RbdDriver(str(ceph / "ceph.conf"), "opensds", "opensds", key=key)

    class Failing:
        def __getattr__(self, _name: str) -> object:
            def fail(*_args: object, **_kwargs: object) -> None:
                raise d.rbd.IOError("injected")
            return fail

    d.rbd = type("rbd", (), {k: getattr(d.rbd, k) for k in dir(d.rbd) if not k.startswith("__")} | {
        "RBD": lambda: Failing()})
    with pytest.raises(DriverError, match="injected") as raised:
        d.create_volume(f"vol-{ids()}", "opensds", MiB, thin=True)
    assert not isinstance(raised.value, PermanentDriverError)
    with pytest.raises(DriverError, match="injected"):
        d.scan("opensds")
