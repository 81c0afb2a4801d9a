"""The LVM thin driver on a real kernel: the volume lifecycle with data checked through the devices."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from opensds_operator.drivers.base import BackendObject, NotFound, Owner, PermanentDriverError, Source
from opensds_operator.drivers.lvm import LvmDriver, parse_lvs

from .kernel import sh
from .nodeplugin import write_at

MiB = 2**20


def digest(device: str, length: int) -> str:
    with open(device, "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


def test_lvm_volume_lifecycle_on_a_real_thin_pool(thin_pool: tuple[str, str]) -> None:
    vg, pool = thin_pool
    driver = LvmDriver(vg, pool)
    [stats] = driver.pools()
    assert (stats.name, stats.total_bytes) == (pool, 2**30)
    assert stats.capabilities.thin and not stats.capabilities.thick

    vol = driver.create_volume("vol-a", pool, 64 * MiB, thin=True)
    assert vol.size_bytes == 64 * MiB and Path(vol.path).exists()
    assert driver.create_volume("vol-a", pool, 64 * MiB, thin=True) == vol  # idempotent
    pattern = os.urandom(4 * MiB)
    write_at(vol.path, 8 * MiB, pattern)
    before = digest(vol.path, 64 * MiB)

    grown = driver.extend_volume("vol-a", pool, 128 * MiB)
    assert grown.size_bytes == 128 * MiB
    assert int(sh("blockdev", "--getsize64", vol.path)) == 128 * MiB
    with pytest.raises(PermanentDriverError, match="cannot shrink"):
        driver.extend_volume("vol-a", pool, 64 * MiB)

    snap = driver.create_snapshot("snap-a", pool, "vol-a")
    assert snap.size_bytes == 128 * MiB
    write_at(vol.path, 0, b"x" * 4096)  # the snapshot must not see later writes

    restored = driver.create_volume("vol-b", pool, 128 * MiB, thin=True, source=Source("Snapshot", "snap-a"))
    assert digest(restored.path, 64 * MiB) == before
    clone = driver.create_volume("vol-c", pool, 256 * MiB, thin=True, source=Source("Volume", "vol-b"))
    assert clone.size_bytes == 256 * MiB
    assert digest(clone.path, 64 * MiB) == before

    assert driver.pools()[0].provisioned_bytes == (128 + 128 + 256) * MiB
    assert driver.list_objects(pool) == ["snap-a", "vol-a", "vol-b", "vol-c"]
    with pytest.raises(NotFound):
        driver.create_volume("vol-d", pool, MiB, thin=True, source=Source("Snapshot", "snap-missing"))

    for backend_id in ("vol-c", "vol-b", "vol-a"):
        driver.delete_volume(backend_id, pool)
        driver.delete_volume(backend_id, pool)  # idempotent
    driver.delete_snapshot("snap-a", pool)
    assert driver.list_objects(pool) == []
    assert not Path(vol.path).exists()


def test_lvm_refuses_thick_volumes_and_foreign_pools(thin_pool: tuple[str, str]) -> None:
    vg, pool = thin_pool
    driver = LvmDriver(vg, pool)
    with pytest.raises(PermanentDriverError, match="thin volumes only"):
        driver.create_volume("vol-x", pool, MiB, thin=False)
    with pytest.raises(PermanentDriverError, match="not 'other'"):
        driver.create_volume("vol-x", "other", MiB, thin=True)


def owner_of(backend_id: str, retained: bool = False) -> Owner:
    kind = "Snapshot" if backend_id.startswith("snap-") else "Volume"
    return Owner("cluster-a", "lvm-a", kind, "ns", f"n-{backend_id}", backend_id.split("-", 1)[1], retained)


def lv_tags(vg: str) -> dict[str, list[str]]:
    rows = parse_lvs(sh("lvs", "--reportformat", "json", "-o", "lv_name,lv_tags", "--", vg))
    return {r["lv_name"]: [t for t in r["lv_tags"].split(",") if t] for r in rows}


def test_lvs_are_tagged_by_lvcreate_and_scanned_with_their_owners(thin_pool: tuple[str, str]) -> None:
    """Old code created untagged LVs: nothing on the LV said which cluster or CR it belonged to."""
    vg, pool = thin_pool
    driver = LvmDriver(vg, pool)
    driver.create_volume("vol-a1", pool, 16 * MiB, thin=True, owner=owner_of("vol-a1"))
    driver.create_snapshot("snap-b2", pool, "vol-a1", owner=owner_of("snap-b2"))
    driver.create_volume("vol-c3", pool, 16 * MiB, thin=True, source=Source("Snapshot", "snap-b2"),
                         owner=owner_of("vol-c3"))
    tags = lv_tags(vg)
    print("lv tags after create:", tags)
    for name in ("vol-a1", "snap-b2", "vol-c3"):  # one owner per LV, whatever LVM copies from an origin
        uids = [t for t in tags[name] if t.startswith("opensds.uid=")]
        assert uids == [f"opensds.uid={name.split('-', 1)[1]}"], tags[name]
    sh("lvcreate", "-qq", "-V", "8m", "-T", f"{vg}/{pool}", "-n", "vol-foreign")  # another tool's LV
    assert driver.scan(pool) == [
        BackendObject("snap-b2", owner_of("snap-b2")),
        BackendObject("vol-a1", owner_of("vol-a1")),
        BackendObject("vol-c3", owner_of("vol-c3")),
        BackendObject("vol-foreign", None),
    ]
    driver.set_owner("vol-a1", pool, owner_of("vol-a1", retained=True))  # a Retain deletion marks the LV itself
    found = {o.backend_id: o.owner for o in driver.scan(pool)}
    assert found["vol-a1"] == owner_of("vol-a1", retained=True)
    driver.create_volume("vol-a1", pool, 16 * MiB, thin=True, owner=owner_of("vol-a1"))  # a retry keeps the mark
    assert {o.backend_id: o.owner for o in driver.scan(pool)}["vol-a1"] == owner_of("vol-a1", retained=True)


def test_quarantine_renames_and_time_tags_lvs_and_purge_removes_them(thin_pool: tuple[str, str]) -> None:
    """Old code had no quarantine: the sweep's only tool was lvremove."""
    vg, pool = thin_pool
    driver = LvmDriver(vg, pool)
    vol = driver.create_volume("vol-a1", pool, 16 * MiB, thin=True, owner=owner_of("vol-a1"))
    write_at(vol.path, 0, b"precious" * 512)
    before = digest(vol.path, 16 * MiB)
    driver.create_snapshot("snap-b2", pool, "vol-a1", owner=owner_of("snap-b2"))
    start = time.time()
    for backend_id in ("snap-b2", "vol-a1", "vol-a1"):  # a retry of a finished quarantine is a no-op
        driver.quarantine(backend_id, pool)
    assert driver.list_objects(pool) == []
    assert driver.get_volume("vol-a1", pool) is None
    with pytest.raises(NotFound):
        driver.create_volume("vol-x", pool, 16 * MiB, thin=True, source=Source("Snapshot", "snap-b2"))
    with pytest.raises(PermanentDriverError, match="in quarantine"):  # never re-made empty beside it
        driver.create_volume("vol-a1", pool, 16 * MiB, thin=True)
    found = {o.backend_id: o for o in driver.scan(pool)}
    assert set(found) == {"vol-a1", "snap-b2"}
    for backend_id, obj in found.items():
        assert obj.owner == owner_of(backend_id)
        assert obj.quarantined_at is not None and start - 2 <= obj.quarantined_at <= time.time() + 2
    assert set(lv_tags(vg)) >= {"quarantine-vol-a1", "quarantine-snap-b2"}
    # recoverable: the data is intact under the quarantine name
    rows = {r["lv_name"]: r for r in parse_lvs(sh("lvs", "--reportformat", "json", "-o", "lv_name,lv_path", vg))}
    assert digest(rows["quarantine-vol-a1"]["lv_path"], 16 * MiB) == before
    driver.purge("vol-a1", pool)
    driver.purge("vol-a1", pool)
    driver.purge("snap-b2", pool)
    assert driver.scan(pool) == [] and not {"quarantine-vol-a1", "quarantine-snap-b2"} & set(lv_tags(vg))


def test_purge_never_touches_a_live_lv(thin_pool: tuple[str, str]) -> None:
    vg, pool = thin_pool
    driver = LvmDriver(vg, pool)
    driver.create_volume("vol-a1", pool, 8 * MiB, thin=True, owner=owner_of("vol-a1"))
    driver.purge("vol-a1", pool)
    assert driver.get_volume("vol-a1", pool) is not None
