"""The file driver on real files: sizes, sparseness, snapshots, clones, idempotency, crash leftovers."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from opensds_operator.drivers import make_driver
from opensds_operator.drivers.base import NotFound, PermanentDriverError, Source
from opensds_operator.drivers.file import TMP_SUFFIX, FileDriver
from opensds_operator.quantity import MiB


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def driver(tmp_path: Path) -> FileDriver:
    return FileDriver(str(tmp_path / "backend"), capacity_bytes=1024 * MiB)


def test_thin_volume_is_sparse_file_of_requested_size(driver: FileDriver) -> None:
    info = driver.create_volume("vol-1", "default", 64 * MiB, thin=True)
    assert os.path.getsize(info.path) == 64 * MiB
    assert info.allocated_bytes < MiB


def test_thick_volume_is_fully_allocated(driver: FileDriver) -> None:
    info = driver.create_volume("vol-1", "default", 8 * MiB, thin=False)
    assert info.allocated_bytes >= 8 * MiB


def test_create_is_idempotent_and_delete_tolerates_missing(driver: FileDriver) -> None:
    a = driver.create_volume("vol-1", "default", 4 * MiB, thin=True)
    b = driver.create_volume("vol-1", "default", 4 * MiB, thin=True)
    assert a == b
    driver.delete_volume("vol-1", "default")
    driver.delete_volume("vol-1", "default")
    assert driver.list_objects("default") == []


def test_extend_grows_and_refuses_shrink(driver: FileDriver) -> None:
    driver.create_volume("vol-1", "default", 4 * MiB, thin=True)
    assert driver.extend_volume("vol-1", "default", 8 * MiB).size_bytes == 8 * MiB
    with pytest.raises(PermanentDriverError, match="cannot shrink"):
        driver.extend_volume("vol-1", "default", 4 * MiB)


def test_snapshot_and_restore_keep_identical_bytes(driver: FileDriver) -> None:
    vol = driver.create_volume("vol-1", "default", 16 * MiB, thin=True)
    with open(vol.path, "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    driver.create_snapshot("snap-1", "default", "vol-1")
    with open(vol.path, "r+b") as f:  # later writes do not reach the snapshot
        f.write(b"x" * 4096)
    restored = driver.create_volume("vol-2", "default", 32 * MiB, thin=True, source=Source("Snapshot", "snap-1"))
    assert restored.size_bytes == 32 * MiB
    with open(restored.path, "rb") as f:
        assert f.read(4096) == b"\0" * 4096
    clone = driver.create_volume("vol-3", "default", 16 * MiB, thin=True, source=Source("Volume", "vol-1"))
    assert sha(clone.path) == sha(vol.path)


def test_missing_source_and_foreign_pool_are_permanent_errors(driver: FileDriver) -> None:
    with pytest.raises(NotFound):
        driver.create_volume("vol-9", "default", MiB, thin=True, source=Source("Snapshot", "snap-x"))
    with pytest.raises(PermanentDriverError, match="not 'gold'"):
        driver.create_volume("vol-9", "gold", MiB, thin=True)


def test_partial_files_from_a_crash_are_removed_at_start(tmp_path: Path) -> None:
    FileDriver(str(tmp_path))
    leftover = tmp_path / "volumes" / f"vol-x.img{TMP_SUFFIX}"
    leftover.write_bytes(b"half")
    d = FileDriver(str(tmp_path))
    assert not leftover.exists() and d.list_objects("default") == []


def test_pool_reports_capacity_and_provisioned_bytes(driver: FileDriver) -> None:
    driver.create_volume("vol-1", "default", 100 * MiB, thin=True)
    [p] = driver.pools()
    assert (p.name, p.total_bytes, p.provisioned_bytes) == ("default", 1024 * MiB, 100 * MiB)
    assert p.capabilities.thin and p.capabilities.snapshot and "local" in p.capabilities.protocols


def test_make_driver_explains_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(PermanentDriverError, match=r"needs parameters\.path"):
        make_driver({"driver": "file", "parameters": {}})
    with pytest.raises(PermanentDriverError, match="'nfs' is not available"):
        make_driver({"driver": "nfs"})
    with pytest.raises(PermanentDriverError, match=r"needs parameters\.conf and parameters\.pool"):
        make_driver({"driver": "ceph"})
    d = make_driver({"driver": "file", "parameters": {"path": str(tmp_path), "capacity": "1Gi"}})
    assert d.pools()[0].total_bytes == 2**30
