"""The LVM thin driver on a real kernel: the volume lifecycle with data checked through the devices."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from opensds_operator.drivers.base import NotFound, PermanentDriverError, Source
from opensds_operator.drivers.lvm import LvmDriver

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
