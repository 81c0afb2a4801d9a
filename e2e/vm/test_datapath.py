"""LVM + NVMe-oF/TCP and LVM + iSCSI on a real kernel: the dock's exports and the node's connectors.

The targets (kernel nvmet over configfs on 127.0.0.1:4420; LIO through rtslib-fb on
127.0.0.1:3260) admit only the host NQNs / initiator IQNs of published nodes; the node plugin
connects under its own identity (nvme-cli, iscsiadm) and finds the device by the volume's
UUID / unit serial. Everything between is real: thin LV, nvmet-tcp, iscsi_target_mod,
nvme-tcp, iscsi_tcp, mkfs, mount, online resize.
"""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from opensds_csi.connectors.iscsi import find_disk, find_disks
from opensds_csi.connectors.multipath import map_over
from opensds_csi.connectors.nvme_tcp import find_namespace
from opensds_csi.proto import csi_pb2
from opensds_operator.drivers.lvm import LvmDriver
from opensds_operator.exports.base import ExportAuth, Exporter, volume_iqn, volume_nqn
from opensds_operator.exports.lio import LioExporter
from opensds_operator.exports.nvmet import CONFIGFS, NvmetExporter

from .kernel import sh
from .nodeplugin import Node, capability, read_at, stage, unstage, write_at

MiB = 2**20
pytestmark = pytest.mark.usefixtures("nvmet", "lio")


@dataclass
class Exported:
    driver: LvmDriver
    exporter: Exporter
    backend_id: str
    uid: str
    device: str
    pool: str

    def publish_to(self, *nodes: str) -> dict[str, str]:
        return self.exporter.export(self.backend_id, self.device, self.uid, list(nodes))

    def visible(self) -> str | None:
        """The device this volume shows up as on this machine (an initiator), if any."""
        return find_namespace(self.uid) if self.exporter.protocol == "nvmeof-tcp" else find_disk(self.uid)


EXPORTERS = {
    "nvmeof-tcp": lambda: NvmetExporter([("127.0.0.1", 4420)]),
    "iscsi": lambda: LioExporter([("127.0.0.1", 3260)], dbroot=Path("/run/opensds-target")),
}


@pytest.fixture(params=sorted(EXPORTERS))
def volume(request: pytest.FixtureRequest, thin_pool: tuple[str, str]) -> Iterator[Exported]:
    vg, pool = thin_pool
    driver = LvmDriver(vg, pool)
    uid = str(uuid.uuid4())
    backend_id = f"vol-{uid}"
    info = driver.create_volume(backend_id, pool, 320 * MiB, thin=True)
    exporter: Exporter = EXPORTERS[request.param]()
    yield Exported(driver, exporter, backend_id, uid, info.path, pool)
    sh("nvme", "disconnect-all")
    subprocess.run(["iscsiadm", "-m", "node", "--logoutall=all"], capture_output=True)
    exporter.unexport(backend_id)
    driver.delete_volume(backend_id, pool)


@pytest.fixture
def nodes() -> Iterator[tuple[Node, Node]]:
    a, b = Node("node-a"), Node("node-b")
    yield a, b
    a.close()
    b.close()


def test_export_admits_only_published_hosts_and_never_any_host(volume: Exported) -> None:
    if volume.exporter.protocol == "iscsi":
        import rtslib_fb

        def acls() -> list[str]:
            (target,) = [t for t in rtslib_fb.FabricModule("iscsi").targets
                         if t.wwn == volume_iqn(volume.backend_id)]
            (tpg,) = target.tpgs
            assert tpg.get_attribute("generate_node_acls") == "0"
            return sorted(acl.node_wwn for acl in tpg.node_acls)

        volume.publish_to("node-a")
        assert acls() == ["iqn.2024-11.io.opensds:node:node-a"]
        volume.publish_to("node-a", "node-b")
        volume.publish_to("node-b")
        assert acls() == ["iqn.2024-11.io.opensds:node:node-b"]
        volume.exporter.unexport(volume.backend_id)
        assert volume.exporter.exported() == []
        return
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
    assert volume.visible() is None  # disconnected
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
    write_at(target, 16 * MiB, pattern)
    unstage(node_a, volume.backend_id)
    target = stage(node_a, volume.backend_id, context, capability(None))
    assert read_at(target, 16 * MiB, MiB) == pattern
    unstage(node_a, volume.backend_id)


def test_unpublished_nodes_cannot_connect(volume: Exported, nodes: tuple[Node, Node]) -> None:
    node_a, node_b = nodes
    context = volume.publish_to("node-a")
    with pytest.raises(grpc.RpcError) as refused:
        stage(node_b, volume.backend_id, context, capability("ext4"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert volume.visible() is None  # no device appeared for node-b
    stage(node_a, volume.backend_id, context, capability("ext4"))
    unstage(node_a, volume.backend_id)
    volume.publish_to()  # unpublished from node-a
    with pytest.raises(grpc.RpcError) as again:
        stage(node_a, volume.backend_id, context, capability("ext4"))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert volume.visible() is None


def test_two_nvme_portals_give_one_multipath_device(thin_pool: tuple[str, str], nodes: tuple[Node, Node]) -> None:
    """Native NVMe multipath: one connection per portal, one block device for the namespace."""
    vg, pool = thin_pool
    driver, uid = LvmDriver(vg, pool), str(uuid.uuid4())
    backend_id = f"vol-{uid}"
    info = driver.create_volume(backend_id, pool, 64 * MiB, thin=True)
    exporter = NvmetExporter([("127.0.0.1", 4420), ("127.0.0.2", 4420)])
    try:
        context = exporter.export(backend_id, info.path, uid, ["node-a"])
        assert context["addresses"] == "127.0.0.1:4420,127.0.0.2:4420"
        node_a, _ = nodes
        target = stage(node_a, backend_id, context, capability(None))
        nqn = volume_nqn(backend_id)
        (subsystem,) = [s for s in Path("/sys/class/nvme-subsystem").iterdir()
                        if (s / "subsysnqn").read_text().strip() == nqn]
        controllers = sorted(p.name for p in subsystem.iterdir() if p.name.startswith("nvme") and "n" not in p.name[4:])
        addresses = sorted((Path("/sys/class/nvme") / c / "address").read_text().strip() for c in controllers)
        assert len(controllers) == 2, addresses
        assert target.exists() and find_namespace(uid) is not None
        unstage(node_a, backend_id)
        assert find_namespace(uid) is None
    finally:
        sh("nvme", "disconnect-all")
        exporter.unexport(backend_id)
        driver.delete_volume(backend_id, pool)


def test_two_iscsi_portals_give_one_dm_multipath_device(thin_pool: tuple[str, str], nodes: tuple[Node, Node]) -> None:
    """dm-multipath: one session per portal, one SCSI disk per path, one map the node uses."""
    vg, pool = thin_pool
    driver, uid = LvmDriver(vg, pool), str(uuid.uuid4())
    backend_id = f"vol-{uid}"
    info = driver.create_volume(backend_id, pool, 64 * MiB, thin=True)
    exporter = LioExporter([("127.0.0.1", 3260), ("127.0.0.2", 3260)], dbroot=Path("/run/opensds-target"))
    node_a, _ = nodes
    try:
        context = exporter.export(backend_id, info.path, uid, ["node-a"])
        assert context["portals"] == "127.0.0.1:3260,127.0.0.2:3260"
        target = stage(node_a, backend_id, context, capability(None))
        disks = find_disks(uid)
        assert len(disks) == 2, disks
        device = map_over(disks)
        assert device is not None
        slaves = sorted(p.name for p in (Path("/sys/block") / Path(device).name / "slaves").iterdir())
        assert slaves == sorted(Path(d).name for d in disks)
        pattern = os.urandom(MiB)
        write_at(target, 8 * MiB, pattern)
        unstage(node_a, backend_id)
        assert find_disks(uid) == [] and not (Path("/sys/block") / Path(device).name).exists()
        target = stage(node_a, backend_id, context, capability(None))
        assert read_at(target, 8 * MiB, MiB) == pattern
        unstage(node_a, backend_id)
    finally:
        subprocess.run(["multipath", "-F"], capture_output=True)
        subprocess.run(["iscsiadm", "-m", "node", "--logoutall=all"], capture_output=True)
        exporter.unexport(backend_id)
        driver.delete_volume(backend_id, pool)


def dhchap_key() -> str:
    """A DH-HMAC-CHAP secret as `nvme gen-dhchap-key` makes it: DHHC-1:00:base64(key + crc32):."""
    key = os.urandom(32)
    return f"DHHC-1:00:{base64.b64encode(key + zlib.crc32(key).to_bytes(4, 'little')).decode()}:"


def test_authenticated_export_admits_only_a_node_holding_the_secret(volume: Exported, nodes: tuple[Node, Node]) -> None:
    """DH-HMAC-CHAP (both directions) for NVMe/TCP, mutual CHAP for iSCSI, from one Secret's keys."""
    secret = {"dhchapHostKey": dhchap_key(), "dhchapCtrlKey": dhchap_key(), "chapUser": "node-a",
              "chapPassword": "Initiator-pw-1", "chapMutualUser": "target", "chapMutualPassword": "Target-pw-123"}
    node_a, _ = nodes
    context = volume.exporter.export(volume.backend_id, volume.device, volume.uid, ["node-a"],
                                     ExportAuth.from_secret(secret))
    assert context["auth"] in ("dhchap-bidirectional", "chap-mutual")
    assert not set(secret.values()) & set(context.values())  # publish_context carries no credential
    with pytest.raises(grpc.RpcError) as missing:
        stage(node_a, volume.backend_id, context, capability("ext4"))
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wrong = {**secret, "dhchapHostKey": dhchap_key(), "chapPassword": "Wrong-password"}
    with pytest.raises(grpc.RpcError) as refused:
        stage(node_a, volume.backend_id, context, capability("ext4"), secrets=wrong)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert wrong["dhchapHostKey"] not in details and "Wrong-password" not in details
    assert volume.visible() is None
    target = stage(node_a, volume.backend_id, context, capability("ext4"), secrets=secret)
    payload = os.urandom(MiB)
    (target / "payload").write_bytes(payload)
    unstage(node_a, volume.backend_id)
    target = stage(node_a, volume.backend_id, context, capability("ext4"), secrets=secret)
    assert (target / "payload").read_bytes() == payload
    unstage(node_a, volume.backend_id)


def test_a_restarted_node_plugin_restages_on_the_same_connection(volume: Exported) -> None:
    """The plugin dies after NodeStage; its successor answers kubelet's repeat without a second connection."""
    context = volume.publish_to("node-a")
    first = Node("node-a")
    target = stage(first, volume.backend_id, context, capability("xfs"))
    (target / "kept").write_bytes(b"before the restart")
    device = volume.visible()
    first.close()
    second = Node("node-a")
    try:
        again = stage(second, volume.backend_id, context, capability("xfs"))
        assert (again / "kept").read_bytes() == b"before the restart" and volume.visible() == device
        unstage(second, volume.backend_id)
        assert volume.visible() is None
    finally:
        second.close()
