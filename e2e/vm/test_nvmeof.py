"""LVM + NVMe-oF/TCP on a real kernel: the dock's nvmet export and the CSI node plugin's connector.

The target (kernel nvmet over configfs, port 127.0.0.1:4420) admits only the host NQNs of
published nodes; the node plugin connects with nvme-cli under its own NQN and finds the
namespace by the volume's UUID. Everything between is real: thin LV, nvmet-tcp, nvme-tcp,
mkfs, mount, online resize.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from opensds_csi.connectors.nvme_tcp import find_namespace
from opensds_csi.node import NodeService
from opensds_csi.proto import csi_pb2, csi_pb2_grpc
from opensds_csi.server import build_server
from opensds_operator.drivers.lvm import LvmDriver
from opensds_operator.exports.base import volume_nqn
from opensds_operator.exports.nvmet import CONFIGFS, NvmetExporter

from .conftest import sh

MiB = 2**20
WORK = Path("/run/opensds-e2e")  # tmpfs inside the VM
Mode = csi_pb2.VolumeCapability.AccessMode


def capability(fs: str | None) -> csi_pb2.VolumeCapability:
    access = csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER)
    if fs is None:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=access)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs), access_mode=access)


pytestmark = pytest.mark.usefixtures("nvmet")


class Node:
    """A CSI node plugin for one node id, on its own socket."""

    def __init__(self, node_id: str) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        endpoint = f"unix://{WORK}/{node_id}.sock"
        self.server = build_server(endpoint, max_workers=4)
        csi_pb2_grpc.add_NodeServicer_to_server(NodeService(node_id, {}, str(WORK / f"{node_id}-state")), self.server)
        self.server.start()
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


@dataclass
class Exported:
    driver: LvmDriver
    exporter: NvmetExporter
    backend_id: str
    uid: str
    device: str
    pool: str

    def publish_to(self, *nodes: str) -> dict[str, str]:
        return self.exporter.export(self.backend_id, self.device, self.uid, list(nodes))


@pytest.fixture
def volume(thin_pool: tuple[str, str]) -> Iterator[Exported]:
    vg, pool = thin_pool
    driver = LvmDriver(vg, pool)
    uid = str(uuid.uuid4())
    backend_id = f"vol-{uid}"
    info = driver.create_volume(backend_id, pool, 320 * MiB, thin=True)
    exporter = NvmetExporter([("127.0.0.1", 4420)])
    yield Exported(driver, exporter, backend_id, uid, info.path, pool)
    sh("nvme", "disconnect-all")
    exporter.unexport(backend_id)
    driver.delete_volume(backend_id, pool)


@pytest.fixture
def nodes() -> Iterator[tuple[Node, Node]]:
    a, b = Node("node-a"), Node("node-b")
    yield a, b
    a.close()
    b.close()


def stage(node: Node, volume_id: str, context: dict[str, str], cap: csi_pb2.VolumeCapability) -> Path:
    staging = WORK / f"{volume_id}-staging"
    staging.mkdir(parents=True, exist_ok=True)
    node.stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, publish_context=context, staging_target_path=str(staging), volume_capability=cap))
    target = WORK / f"{volume_id}-target"
    node.stub.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, publish_context=context, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap))
    return target


def unstage(node: Node, volume_id: str) -> None:
    node.stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=str(WORK / f"{volume_id}-target")))
    node.stub.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(WORK / f"{volume_id}-staging")))


def test_export_admits_only_published_hosts_and_never_any_host(volume: Exported) -> None:
    volume.publish_to("node-a")
    subsystem = CONFIGFS / "subsystems" / volume_nqn(volume.backend_id)
    assert (subsystem / "attr_allow_any_host").read_text().strip() == "0"
    assert sorted(p.name for p in (subsystem / "allowed_hosts").iterdir()) == [
        "nqn.2024-11.io.opensds:node:node-a"]
    volume.publish_to("node-a", "node-b")
    volume.publish_to("node-b")
    assert sorted(p.name for p in (subsystem / "allowed_hosts").iterdir()) == [
        "nqn.2024-11.io.opensds:node:node-b"]
    volume.exporter.unexport(volume.backend_id)
    assert not subsystem.exists() and volume.exporter.exported() == []


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_filesystem_data_survives_a_fresh_connection_and_grows_online(
        volume: Exported, nodes: tuple[Node, Node], fs: str) -> None:
    node_a, _ = nodes
    context = volume.publish_to("node-a")
    target = stage(node_a, volume.backend_id, context, capability(fs))
    payload = os.urandom(4 * MiB)
    (target / "payload").write_bytes(payload)
    unstage(node_a, volume.backend_id)
    assert find_namespace(volume.uid) is None  # disconnected
    target = stage(node_a, volume.backend_id, context, capability(fs))
    assert hashlib.sha256((target / "payload").read_bytes()).digest() == hashlib.sha256(payload).digest()
    before = os.statvfs(target)
    volume.driver.extend_volume(volume.backend_id, volume.pool, 448 * MiB)
    volume.exporter.resize(volume.backend_id)
    grown = node_a.stub.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.backend_id, volume_path=str(target)))
    after = os.statvfs(target)
    assert grown.capacity_bytes == 448 * MiB
    assert (after.f_blocks - before.f_blocks) * after.f_frsize >= 100 * MiB  # 128 MiB minus fs metadata
    unstage(node_a, volume.backend_id)


def test_raw_block_bytes_survive_a_fresh_connection(volume: Exported, nodes: tuple[Node, Node]) -> None:
    node_a, _ = nodes
    context = volume.publish_to("node-a")
    target = stage(node_a, volume.backend_id, context, capability(None))
    pattern = os.urandom(MiB)
    fd = os.open(target, os.O_WRONLY)
    os.pwrite(fd, pattern, 16 * MiB)
    os.fsync(fd)
    os.close(fd)
    unstage(node_a, volume.backend_id)
    target = stage(node_a, volume.backend_id, context, capability(None))
    fd = os.open(target, os.O_RDONLY)
    assert os.pread(fd, MiB, 16 * MiB) == pattern
    os.close(fd)
    unstage(node_a, volume.backend_id)


def test_unpublished_nodes_cannot_connect(volume: Exported, nodes: tuple[Node, Node]) -> None:
    node_a, node_b = nodes
    context = volume.publish_to("node-a")
    with pytest.raises(grpc.RpcError) as refused:
        stage(node_b, volume.backend_id, context, capability("ext4"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert find_namespace(volume.uid) is None  # no device appeared for node-b
    stage(node_a, volume.backend_id, context, capability("ext4"))
    unstage(node_a, volume.backend_id)
    volume.publish_to()  # unpublished from node-a
    with pytest.raises(grpc.RpcError) as again:
        stage(node_a, volume.backend_id, context, capability("ext4"))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert find_namespace(volume.uid) is None
