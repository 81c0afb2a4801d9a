"""The Ceph RBD driver against a real single-node Ceph cluster (hack/ceph.sh, cephx on).

The driver connects as client.opensds, whose caps are limited to the `opensds` pool.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from opensds_operator.drivers.base import DriverError, NotFound, PermanentDriverError, Source

ROOT = Path(__file__).resolve().parents[2]
CEPH_DIR = ROOT / ".ceph"
MiB = 2**20

pytestmark = pytest.mark.skipif(shutil.which("ceph-mon") is None, reason="Ceph is not installed (apt ceph-mon ...)")


@pytest.fixture(scope="module")
def ceph() -> Iterator[Path]:
    running = subprocess.run(["bash", str(ROOT / "hack/ceph.sh"), "status"], capture_output=True).returncode == 0
    if not running:
        subprocess.run(["bash", str(ROOT / "hack/ceph.sh"), "up"], check=True)
    yield CEPH_DIR
    if not running and os.environ.get("OPENSDS_KEEP_CLUSTER") != "1":
        subprocess.run(["bash", str(ROOT / "hack/ceph.sh"), "down"], check=True)


@pytest.fixture
def driver(ceph: Path):  # type: ignore[no-untyped-def]
    from opensds_operator.drivers.rbd import RbdDriver

    key = next(line.split("=", 1)[1].strip() for line in (ceph / "client.opensds.keyring").read_text().splitlines()
               if line.strip().startswith("key"))
    d = RbdDriver(str(ceph / "ceph.conf"), "opensds", "opensds", key=key, clone_depth=2)
    yield d
    # Dependencies (snapshots of clones hold their parent's snapshot) resolve over passes,
    # as the dock's retries would.
    for _ in range(6):
        for name in d.list_objects("opensds"):
            with contextlib.suppress(DriverError):
                (d.delete_snapshot if name.startswith("snap-") else d.delete_volume)(name, "opensds")
        if not d.list_objects("opensds"):
            break
    assert d.list_objects("opensds") == []


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
