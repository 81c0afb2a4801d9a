"""The CSI node plugin on this host's real loop devices, mounts and filesystems, over its socket.

No cluster needed: publish_context is what the dock writes for the file backend
({"transport": "local", "path": <root>/volumes/vol-<uid>.img}), so a sparse file stands in for a
volume; the plugin's local root is the test's directory.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from opensds_csi.errors import Aborted
from opensds_csi.locks import KeyLocks
from opensds_csi.mounts import mounts
from opensds_csi.node import NodeService
from opensds_csi.proto import csi_pb2, csi_pb2_grpc
from opensds_csi.server import build_server

pytestmark = pytest.mark.usefixtures("loop_devices")  # root and loop devices, or a failure naming them
MIB = 1 << 20
Mode = csi_pb2.VolumeCapability.AccessMode


def capability(fs: str | None, mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    access = csi_pb2.VolumeCapability.AccessMode(mode=mode)  # type: ignore[arg-type]
    if fs is None:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=access)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs), access_mode=access)


class Node:
    """A node plugin process-equivalent: the service on a real unix socket, and a client."""

    def __init__(self, tmp: Path, state: Path) -> None:
        self.endpoint = f"unix://{tmp}/node-{len(list(tmp.glob('node-*.sock')))}.sock"
        self.server = build_server(self.endpoint, max_workers=4)
        self.service = NodeService("node-1", {"topology.block.csi.opensds.io/node": "node-1"}, str(state),
                                   local_roots=[str(tmp / "backend")])
        csi_pb2_grpc.add_NodeServicer_to_server(self.service, self.server)
        self.server.start()
        self.channel = grpc.insecure_channel(self.endpoint)
        self.stub = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


class Volume:
    def __init__(self, tmp: Path, name: str, size: int) -> None:
        self.id = f"opensds-system/{name}"
        self.uid = str(uuid.uuid4())
        self.file = tmp / "backend" / "volumes" / f"vol-{self.uid}.img"  # the file driver's layout
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file, "wb") as f:
            f.truncate(size)
        self.context = {"transport": "local", "path": str(self.file)}
        self.volume_context = {"accessProtocol": "local", "volumeUID": self.uid}
        self.staging = tmp / f"{name}-staging"
        self.target = tmp / f"{name}-target"

    def stage(self, node: Node, cap: csi_pb2.VolumeCapability, context: dict[str, str] | None = None,
              volume_context: dict[str, str] | None = None) -> None:
        self.staging.mkdir(exist_ok=True)
        node.stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=self.id, publish_context=self.context if context is None else context,
            staging_target_path=str(self.staging), volume_capability=cap,
            volume_context=self.volume_context if volume_context is None else volume_context))

    def publish(self, node: Node, cap: csi_pb2.VolumeCapability, readonly: bool = False) -> None:
        node.stub.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=self.id, publish_context=self.context, staging_target_path=str(self.staging),
            target_path=str(self.target), volume_capability=cap, readonly=readonly))

    def unpublish(self, node: Node) -> None:
        node.stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.id, target_path=str(self.target)))

    def unstage(self, node: Node) -> None:
        node.stub.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.id, staging_target_path=str(self.staging)))


def loops_of(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True, check=True).stdout
    return [d["name"] for d in (json.loads(out).get("loopdevices", []) if out.strip() else [])
            if (d.get("back-file") or "").removesuffix(" (deleted)") == str(path)]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Node, Path]]:
    node = Node(tmp_path, tmp_path / "state")
    yield node, tmp_path
    node.close()
    for target in sorted((m for m in mounts() if m.startswith(str(tmp_path))), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    for image in [*tmp_path.glob("**/*.img"), *tmp_path.glob("**/shadow")]:
        for loop in loops_of(image):
            subprocess.run(["losetup", "-d", loop], check=False)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_data_survives_unstage_and_restage_on_a_fresh_loop_device(env: tuple[Node, Path], fs: str) -> None:
    node, tmp = env
    volume = Volume(tmp, f"data-{fs}", 320 * MIB)  # xfs wants >= 300 MiB; sparse, so free
    volume.stage(node, capability(fs))
    volume.publish(node, capability(fs))
    payload = os.urandom(MIB)
    (volume.target / "payload").write_bytes(payload)
    first_loop = loops_of(volume.file)
    assert mounts()[str(volume.target)].fstype == fs
    volume.unpublish(node)
    volume.unstage(node)
    assert loops_of(volume.file) == [] and not volume.target.exists()
    volume.stage(node, capability(fs))  # already formatted: mounted, not reformatted
    volume.publish(node, capability(fs))
    assert hashlib.sha256((volume.target / "payload").read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert len(first_loop) == 1 and len(loops_of(volume.file)) == 1
    volume.unpublish(node)
    volume.unstage(node)


def test_raw_block_volume_keeps_its_bytes_across_restage(env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume = Volume(tmp, "raw", 16 * MIB)
    volume.stage(node, capability(None))
    volume.publish(node, capability(None))
    pattern = os.urandom(64 * 1024)
    fd = os.open(volume.target, os.O_WRONLY)
    os.pwrite(fd, pattern, 4 * MIB)
    os.fsync(fd)
    os.close(fd)
    volume.unpublish(node)
    volume.unstage(node)
    volume.stage(node, capability(None))
    volume.publish(node, capability(None))
    fd = os.open(volume.target, os.O_RDONLY)
    assert os.pread(fd, len(pattern), 4 * MIB) == pattern
    os.close(fd)
    stats = node.stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.id, volume_path=str(volume.target)))
    assert stats.usage[0].total == 16 * MIB and not stats.volume_condition.abnormal
    volume.unpublish(node)
    volume.unstage(node)


def test_read_only_publish_refuses_writes(env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume = Volume(tmp, "ro", 64 * MIB)
    volume.stage(node, capability("ext4"))
    volume.publish(node, capability("ext4"), readonly=True)
    with pytest.raises(OSError):
        (volume.target / "nope").write_text("x")
    volume.unpublish(node)
    volume.unstage(node)


def test_stats_report_bytes_and_inodes_and_not_found_for_unknown_paths(env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume = Volume(tmp, "stats", 64 * MIB)
    volume.stage(node, capability("ext4"))
    volume.publish(node, capability("ext4"))
    stats = node.stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.id, volume_path=str(volume.target)))
    units = {u.unit: u for u in stats.usage}
    assert 50 * MIB < units[csi_pb2.VolumeUsage.BYTES].total <= 64 * MIB
    assert units[csi_pb2.VolumeUsage.INODES].total > 0
    for vid, path in ((volume.id, str(tmp)), ("opensds-system/unknown", str(volume.target))):
        with pytest.raises(grpc.RpcError) as e:
            node.stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    volume.unpublish(node)
    volume.unstage(node)


def test_gone_device_is_an_abnormal_condition_and_unstage_still_succeeds(env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume = Volume(tmp, "gone", 16 * MIB)
    volume.stage(node, capability(None))
    volume.publish(node, capability(None))
    volume.unpublish(node)
    (loop,) = loops_of(volume.file)
    subprocess.run(["losetup", "-d", loop], check=True)  # the device vanishes behind the plugin's back
    stats = node.stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.id, volume_path=str(volume.staging)))
    assert stats.volume_condition.abnormal and "loop" in stats.volume_condition.message
    volume.unstage(node)
    with pytest.raises(grpc.RpcError) as e:
        node.stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume.id, volume_path=str(volume.staging)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_online_expand_grows_the_mounted_xfs_filesystem(env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume = Volume(tmp, "grow", 320 * MIB)
    volume.stage(node, capability("xfs"))
    volume.publish(node, capability("xfs"))
    before = os.statvfs(volume.target)
    os.truncate(volume.file, 448 * MIB)  # what the dock's file driver does on expand
    response = node.stub.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.id, volume_path=str(volume.target)))
    after = os.statvfs(volume.target)
    assert response.capacity_bytes == 448 * MIB
    assert (after.f_blocks - before.f_blocks) * after.f_frsize == 128 * MIB
    volume.unpublish(node)
    volume.unstage(node)


def test_a_restarted_plugin_restages_idempotently(env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume = Volume(tmp, "restart", 64 * MIB)
    volume.stage(node, capability("ext4"))
    node.close()
    again = Node(tmp, tmp / "state")  # same state dir, fresh process state
    try:
        volume.stage(again, capability("ext4"))  # kubelet repeats the call: OK, same device
        assert len(loops_of(volume.file)) == 1
        other = tmp / "elsewhere"
        other.mkdir()
        with pytest.raises(grpc.RpcError) as e:
            again.stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.id, publish_context=volume.context, staging_target_path=str(other),
                volume_capability=capability("ext4")))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        volume.unstage(again)
    finally:
        again.close()


def _digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def _refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def test_a_loop_device_holding_a_partition_table_is_refused_and_its_bytes_left_untouched(
        env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume = Volume(tmp, "parted", 64 * MIB)
    # parted is installed by hack/deps.sh; no skip: a machine without it fails here, naming it.
    subprocess.run(["parted", "-s", str(volume.file), "mklabel", "gpt", "mkpart", "data", "1MiB", "63MiB"],
                   check=True, capture_output=True)
    with open(volume.file, "r+b") as f:  # someone's data inside the partition
        f.seek(8 * MIB)
        f.write(os.urandom(MIB))
    before = _digest(volume.file)
    refused = _refused(lambda: volume.stage(node, capability("ext4")))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "partition table (PTTYPE=gpt)" in (refused.details() or "")
    assert _digest(volume.file) == before
    assert loops_of(volume.file) == [] and str(volume.staging) not in mounts()  # nothing left attached


def test_a_device_with_data_but_no_signature_is_refused_not_formatted(env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume = Volume(tmp, "unknown", 16 * MIB)
    with open(volume.file, "r+b") as f:  # bytes blkid has no name for, in the last MiB
        f.seek(15 * MIB + 4096)
        f.write(b"\x5a" * 4096)
    before = _digest(volume.file)
    refused = _refused(lambda: volume.stage(node, capability("ext4")))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and "holds data" in (refused.details() or "")
    assert _digest(volume.file) == before and loops_of(volume.file) == []


def test_publish_context_naming_anything_but_this_volume_is_refused_before_attaching(
        env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume, other = Volume(tmp, "trusted", 16 * MIB), Volume(tmp, "other", 16 * MIB)
    decoy = tmp / "etc" / "shadow"  # a host file (a decoy: the real one is never risked)
    decoy.parent.mkdir()
    decoy.write_text("root:$6$secret-hash:19000:0:99999:7:::\n" * 200)
    decoy.chmod(0o640)
    link = volume.file.parent / f"vol-{uuid.uuid4()}.img"
    link.symlink_to(decoy)  # a vol-<uid>.img name inside the root, pointing out of it
    outside = tmp / "elsewhere" / f"vol-{volume.uid}.img"  # the right name outside the roots
    outside.parent.mkdir()
    outside.write_bytes(bytes(MIB))
    cases: list[tuple[dict[str, str], dict[str, str], grpc.StatusCode]] = [
        ({"transport": "local", "path": str(decoy)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"transport": "local", "path": str(link)}, {}, grpc.StatusCode.FAILED_PRECONDITION),
        ({"transport": "local", "path": str(outside)}, {}, grpc.StatusCode.FAILED_PRECONDITION),
        (other.context, volume.volume_context, grpc.StatusCode.FAILED_PRECONDITION),  # another volume's image
        (volume.context, {**volume.volume_context, "accessProtocol": "iscsi"}, grpc.StatusCode.FAILED_PRECONDITION),
        ({"transport": "nvmeof-tcp", "nqn": "nqn.2014-08.org.example:host-boot", "addresses": "127.0.0.1:4420",
          "uuid": ""}, {}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"transport": "iscsi", "iqn": "iqn.2003-01.org.example:host", "portals": "127.0.0.1:3260", "serial": ""},
         {}, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for context, volume_context, code in cases:
        refused = _refused(functools.partial(volume.stage, node, capability(None), context, volume_context))
        assert refused.code() == code, (context, refused.details())
    assert loops_of(decoy) == [] and loops_of(outside) == [] and loops_of(other.file) == []
    volume.stage(node, capability(None))  # its own context is accepted
    assert len(loops_of(volume.file)) == 1
    volume.unstage(node)


def test_a_corrupt_state_record_does_not_block_unstage(env: tuple[Node, Path]) -> None:
    node, tmp = env
    volume = Volume(tmp, "corrupt", 64 * MIB)
    volume.stage(node, capability("ext4"))
    (volume.staging / "kept").write_bytes(b"data")
    (record,) = (tmp / "state").glob("*.json")
    record.write_text('{"volume_id": "opensds-system/corrupt", "transp')  # a torn or damaged record
    volume.unstage(node)
    assert loops_of(volume.file) == [] and str(volume.staging) not in mounts()
    assert [p.suffix for p in (tmp / "state").iterdir()] == [".corrupt"]  # kept for a human
    volume.stage(node, capability("ext4"))
    assert (volume.staging / "kept").read_bytes() == b"data"
    volume.unstage(node)


def test_stats_of_a_filesystem_that_stops_answering_are_abnormal_and_tie_up_no_workers(
        env: tuple[Node, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    node, tmp = env
    volume = Volume(tmp, "dead", 64 * MIB)
    volume.stage(node, capability("ext4"))
    volume.publish(node, capability("ext4"))
    release, real = threading.Event(), os.statvfs

    def hanging(path: Any) -> os.statvfs_result:  # a dead mount: statfs never returns
        if os.fspath(path) == str(volume.target):
            release.wait()
        return real(path)

    monkeypatch.setattr("opensds_csi.mounts.STATS_TIMEOUT", 1.0)
    monkeypatch.setattr(os, "statvfs", hanging)
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.id, volume_path=str(volume.target))
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:  # twice the server's 4 workers
            answers = list(pool.map(lambda _: node.stub.NodeGetVolumeStats(request, timeout=15), range(8)))
        assert time.monotonic() - started < 8
        assert all(a.volume_condition.abnormal and "does not answer" in a.volume_condition.message for a in answers)
        healthy = node.stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume.id, volume_path=str(volume.staging)), timeout=15)  # the pool still serves
        assert not healthy.volume_condition.abnormal
    finally:
        release.set()
    volume.unpublish(node)
    volume.unstage(node)


def test_missing_arguments_are_invalid(env: tuple[Node, Path]) -> None:
    node, _ = env
    calls: list[tuple[Callable[[Any], Any], Any]] = [
        (node.stub.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(staging_target_path="/x",
                                                                   volume_capability=capability("ext4"))),
        (node.stub.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x")),
        (node.stub.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(volume_id="v",
                                                                       volume_capability=capability("ext4"))),
        (node.stub.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(volume_id="v")),
    ]
    for call, request in calls:
        with pytest.raises(grpc.RpcError) as e:
            call(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_second_operation_on_the_same_volume_is_aborted_not_queued() -> None:
    locks = KeyLocks()
    with locks.hold("opensds-system/v1"):
        with pytest.raises(Aborted), locks.hold("opensds-system/v1"):
            pass
        with locks.hold("opensds-system/v2"):
            pass
    with locks.hold("opensds-system/v1"):
        pass


def test_a_restored_xfs_volume_mounts_beside_its_mounted_source(env: tuple[Node, Path]) -> None:
    """A snapshot restore copies the XFS UUID; XFS refuses a duplicate UUID unless mounted nouuid."""
    node, tmp = env
    source = Volume(tmp, "xfs-source", 320 * MIB)
    source.stage(node, capability("xfs"))
    source.publish(node, capability("xfs"))
    (source.target / "payload").write_bytes(b"snapshot me")
    source.unpublish(node)
    source.unstage(node)  # flushed: the copy below is what a snapshot restore hands the node
    clone = Volume(tmp, "xfs-clone", 320 * MIB)
    shutil.copyfile(source.file, clone.file)
    source.stage(node, capability("xfs"))
    source.publish(node, capability("xfs"))
    clone.stage(node, capability("xfs"))
    clone.publish(node, capability("xfs"))
    assert (clone.target / "payload").read_bytes() == b"snapshot me"
    for volume in (clone, source):
        volume.unpublish(node)
        volume.unstage(node)
