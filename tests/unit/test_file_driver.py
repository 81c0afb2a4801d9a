"""The file driver on real files: sizes, sparseness, snapshots, clones, idempotency, crash leftovers."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opensds_operator.drivers import make_driver
from opensds_operator.drivers.base import BackendObject, NotFound, Owner, PermanentDriverError, Source
from opensds_operator.drivers.file import OWNER_XATTR, PARTIAL_STALE_SECONDS, TMP_SUFFIX, FileDriver
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
    stale = time.time() - PARTIAL_STALE_SECONDS - 1
    os.utime(leftover, (stale, stale))
    d = FileDriver(str(tmp_path))
    assert not leftover.exists() and d.list_objects("default") == []


def test_a_partial_another_dock_is_still_writing_survives_a_start(tmp_path: Path) -> None:
    """Old code deleted every partial at start: a second dock (rolling update) lost its clone in progress."""
    FileDriver(str(tmp_path))
    in_progress = tmp_path / "volumes" / f"vol-x.img{TMP_SUFFIX}"
    in_progress.write_bytes(b"being written")
    FileDriver(str(tmp_path))
    assert in_progress.read_bytes() == b"being written"


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


def owner(uid: str, kind: str = "Volume", cluster: str = "c-1") -> Owner:
    return Owner(cluster, "file-a", kind, "ns", f"name-{uid}", uid)


def test_owner_tag_is_on_the_file_before_it_gets_its_final_name(
        driver: FileDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, bytes] = {}
    replace = os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        if str(src).endswith(f".img{TMP_SUFFIX}"):
            seen[Path(dst).name] = os.getxattr(src, OWNER_XATTR)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    driver.create_volume("vol-1", "default", 4 * MiB, thin=True, owner=owner("1"))
    driver.create_snapshot("snap-1", "default", "vol-1", owner=owner("2", "Snapshot"))
    driver.create_volume("vol-2", "default", 4 * MiB, thin=True, source=Source("Snapshot", "snap-1"), owner=owner("3"))
    assert {k: json.loads(v)["uid"] for k, v in seen.items()} == {"vol-1.img": "1", "snap-1.img": "2", "vol-2.img": "3"}


def test_scan_reports_owners_and_untagged_foreign_files_as_owner_none(driver: FileDriver) -> None:
    driver.create_volume("vol-1", "default", MiB, thin=True, owner=owner("1"))
    driver.create_snapshot("snap-1", "default", "vol-1", owner=owner("1", "Snapshot"))
    foreign = driver.volumes / "vol-foreign.img"  # another tool's (or an older release's) file
    foreign.write_bytes(b"data")
    (driver.volumes / "notes.txt").write_text("not an object")
    assert driver.scan("default") == [
        BackendObject("snap-1", owner("1", "Snapshot")),
        BackendObject("vol-1", owner("1")),
        BackendObject("vol-foreign", None),
    ]
    # a retry of the create adopts an untagged object; a tagged one keeps its owner
    driver.create_volume("vol-foreign", "default", 4, thin=True, owner=owner("foreign"))
    driver.create_volume("vol-1", "default", MiB, thin=True, owner=owner("other"))
    owners = {o.backend_id: o.owner for o in driver.scan("default")}
    assert owners["vol-foreign"] == owner("foreign") and owners["vol-1"] == owner("1")
    # a copy (cp -a) carries its original's tag: that names another UID, so it is no owner
    shutil.copy2(driver.volumes / "vol-1.img", driver.volumes / "vol-copy.img")  # copies xattrs too
    assert {o.backend_id: o.owner for o in driver.scan("default")}["vol-copy"] is None


def test_retain_is_recorded_on_the_object_itself(driver: FileDriver) -> None:
    driver.create_volume("vol-1", "default", MiB, thin=True, owner=owner("1"))
    retained = Owner("c-1", "file-a", "Volume", "ns", "name-1", "1", retained=True)
    driver.set_owner("vol-1", "default", retained)
    # a new driver (a restarted dock, a lost StorageBackend) reads it back from the file
    [found] = FileDriver(str(driver.root), capacity_bytes=1024 * MiB).scan("default")
    assert found.owner == retained and found.owner.retained
    with pytest.raises(NotFound):
        driver.set_owner("vol-missing", "default", retained)


def test_quarantine_hides_the_object_and_purge_deletes_it(driver: FileDriver) -> None:
    """Old code had no quarantine: the sweep's only tool was delete."""
    info = driver.create_volume("vol-1", "default", 4 * MiB, thin=True, owner=owner("1"))
    Path(info.path).write_bytes(b"precious")
    driver.create_snapshot("snap-1", "default", "vol-1", owner=owner("1", "Snapshot"))
    before = time.time()
    driver.quarantine("vol-1", "default")
    driver.quarantine("vol-1", "default")  # idempotent: the dock retries after crashes
    driver.quarantine("snap-1", "default")
    assert driver.list_objects("default") == []
    assert driver.get_volume("vol-1", "default") is None
    with pytest.raises(NotFound):
        driver.create_volume("vol-2", "default", MiB, thin=True, source=Source("Snapshot", "snap-1"))
    with pytest.raises(PermanentDriverError, match="in quarantine"):  # never re-made empty beside it
        driver.create_volume("vol-1", "default", 4 * MiB, thin=True)
    found = {o.backend_id: o for o in driver.scan("default")}
    assert found["vol-1"].owner == owner("1") and found["snap-1"].owner == owner("1", "Snapshot")
    stamp = found["vol-1"].quarantined_at
    assert stamp is not None and before - 1 <= stamp <= time.time() + 1
    driver.quarantine("vol-1", "default")  # a retry keeps the first time
    assert {o.backend_id: o for o in driver.scan("default")}["vol-1"].quarantined_at == stamp
    # recoverable: the data is still there, under quarantine/
    assert (driver.root / "quarantine" / "volumes" / "vol-1.img").read_bytes() == b"precious"
    assert driver.pools()[0].provisioned_bytes == 0
    driver.purge("vol-1", "default")
    driver.purge("vol-1", "default")
    driver.purge("snap-1", "default")
    assert driver.scan("default") == []
    assert not any((driver.root / "quarantine").rglob("*.*"))


def test_purge_never_touches_a_live_object(driver: FileDriver) -> None:
    driver.create_volume("vol-1", "default", MiB, thin=True, owner=owner("1"))
    driver.purge("vol-1", "default")
    assert driver.get_volume("vol-1", "default") is not None


def test_images_are_0600_in_0700_directories(tmp_path: Path) -> None:
    """Old code: images 0644 in 0755 directories, readable by every local user."""
    old_umask = os.umask(0o022)
    try:
        d = FileDriver(str(tmp_path / "backend"))
        vol = d.create_volume("vol-1", "default", MiB, thin=True)
        d.create_snapshot("snap-1", "default", "vol-1")
        clone = d.create_volume("vol-2", "default", MiB, thin=True, source=Source("Snapshot", "snap-1"))
    finally:
        os.umask(old_umask)
    for image in (vol.path, clone.path, d.snapshots / "snap-1.img"):
        assert stat.S_IMODE(os.stat(image).st_mode) == 0o600, image
    for directory in (d.root, d.volumes, d.snapshots):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    d.quarantine("snap-1", "default")
    assert stat.S_IMODE(os.stat(d.root / "quarantine" / "snapshots" / "snap-1.img").st_mode) == 0o600
    for directory in (d.root / "quarantine", d.root / "quarantine" / "volumes"):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory


def test_a_directory_from_an_older_release_is_tightened_at_start(tmp_path: Path) -> None:
    (tmp_path / "volumes").mkdir(mode=0o755)
    old = tmp_path / "volumes" / "vol-old.img"
    old.write_bytes(b"x")
    os.chmod(old, 0o644)
    FileDriver(str(tmp_path))
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "volumes").stat().st_mode) == 0o700


def no_user_xattrs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without user xattrs (older tmpfs, some network filesystems)."""
    def refuse(*_args: object) -> bytes:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refuse)
    monkeypatch.setattr(os, "getxattr", refuse)


def test_without_user_xattrs_the_owner_is_a_sidecar_written_before_the_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_user_xattrs(monkeypatch)
    d = FileDriver(str(tmp_path))
    replace = os.replace
    order: list[str] = []

    def spy(src: str | Path, dst: str | Path) -> None:
        order.append(Path(dst).name)
        if Path(dst).name == "vol-1.img":
            assert (d.volumes / "vol-1.owner.json").exists()
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    d.create_volume("vol-1", "default", MiB, thin=True, owner=owner("1"))
    assert order == ["vol-1.owner.json", "vol-1.img"]
    assert d.scan("default") == [BackendObject("vol-1", owner("1"))]
    retained = Owner("c-1", "file-a", "Volume", "ns", "name-1", "1", retained=True)
    d.set_owner("vol-1", "default", retained)
    d.quarantine("vol-1", "default")
    [found] = d.scan("default")
    assert found.owner == retained and found.quarantined_at is not None
    assert d.list_objects("default") == [] and not (d.volumes / "vol-1.owner.json").exists()
    d.purge("vol-1", "default")
    assert not any(d.root.rglob("*.json")) and d.scan("default") == []


def test_a_quarantine_interrupted_between_its_renames_keeps_the_owner_and_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_user_xattrs(monkeypatch)
    d = FileDriver(str(tmp_path))
    d.create_volume("vol-1", "default", MiB, thin=True, owner=owner("1"))
    (d.root / "quarantine" / "volumes" / "vol-1.quarantined").write_text("1000.0\n")
    os.rename(d.volumes / "vol-1.img", d.root / "quarantine" / "volumes" / "vol-1.img")  # crash here
    assert d.scan("default") == [BackendObject("vol-1", owner("1"), 1000.0)]
    d.quarantine("vol-1", "default")
    assert d.scan("default") == [BackendObject("vol-1", owner("1"), 1000.0)]
    assert not (d.volumes / "vol-1.owner.json").exists()


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem without user xattrs (ramfs answers EOPNOTSUPP), when we may mount one."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    if os.geteuid() != 0:  # the README's supported machine runs the tests as root: a failure, not a skip
        pytest.fail("mounting a ramfs needs root (run the tests as root, as the README says)", pytrace=False)
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0700", "none", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_on_a_real_filesystem_without_user_xattrs_owners_live_in_sidecars(ramfs: Path) -> None:
    with pytest.raises(OSError) as probe:
        (ramfs / "probe").touch()
        os.setxattr(ramfs / "probe", OWNER_XATTR, b"{}")
    assert probe.value.errno == errno.EOPNOTSUPP
    d = FileDriver(str(ramfs / "backend"))
    d.create_volume("vol-1", "default", MiB, thin=True, owner=owner("1"))
    d.create_snapshot("snap-1", "default", "vol-1", owner=owner("1", "Snapshot"))
    d.create_volume("vol-2", "default", MiB, thin=True, source=Source("Snapshot", "snap-1"), owner=owner("2"))
    assert (d.volumes / "vol-1.owner.json").exists()
    assert {o.backend_id: o.owner for o in d.scan("default")} == {
        "vol-1": owner("1"), "snap-1": owner("1", "Snapshot"), "vol-2": owner("2")}
    d.quarantine("vol-2", "default")
    quarantined = {o.backend_id: o for o in d.scan("default")}["vol-2"]
    assert quarantined.owner == owner("2") and quarantined.quarantined_at is not None
    assert (d.root / "quarantine" / "volumes" / "vol-2.owner.json").exists()
    d.purge("vol-2", "default")
    assert d.list_objects("default") == ["snap-1", "vol-1"] and len(d.scan("default")) == 2
