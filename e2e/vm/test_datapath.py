"""LVM + NVMe-oF/TCP and LVM + iSCSI on a real kernel: the dock's exports and the node's connectors.

The targets (kernel nvmet over configfs on 127.0.0.1:4420; LIO through rtslib-fb on
127.0.0.1:3260) admit only the host NQNs / initiator IQNs of published nodes; the node plugin
connects under its own identity (nvme-cli, iscsiadm) and finds the device by the volume's
UUID / unit serial. Everything between is real: thin LV, nvmet-tcp, iscsi_target_mod,
nvme-tcp, iscsi_tcp, mkfs, mount, online resize.
"""
from __future__ import annotations

import base64
import glob
import hashlib
import mmap
import os
import stat
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from opensds_csi.connectors.iscsi import find_disk, find_disks
from opensds_csi.connectors.multipath import map_over
from opensds_csi.connectors.nvme_tcp import FABRICS, connect_options, find_namespace
from opensds_csi.proto import csi_pb2
from opensds_operator.credentials import generate_node_stage_secret
from opensds_operator.drivers.lvm import LvmDriver
from opensds_operator.exports.base import ExportAuth, Exporter, node_host_nqn, node_iqn, volume_iqn, volume_nqn
from opensds_operator.exports.lio import LioExporter
from opensds_operator.exports.nvmet import CONFIGFS, NvmetExporter

from .kernel import nvme_host_without_multipath, sh
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


# ---------------------------------------------------------------- unpublish cuts live connections
# Two nodes are two initiator identities on this one kernel: node-a and node-b connect with their
# own host NQN / initiator IQN (as the node plugin derives them), each getting a block device of
# its own, and keep writing while the dock unpublishes node-a.

BLOCK = 4096


def direct_write(device: str, offset: int, fill: int) -> None:
    """One O_DIRECT write (no page cache between the writer and the target)."""
    buffer = mmap.mmap(-1, BLOCK)
    buffer.write(bytes([fill]) * BLOCK)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buffer], offset) == BLOCK
    finally:
        os.close(fd)


def direct_read(device: str, offset: int) -> bytes:
    buffer = mmap.mmap(-1, BLOCK)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buffer], offset)
    finally:
        os.close(fd)
    return bytes(buffer)


class Attempt:
    """A call run in a thread, so a test can bound how long the kernel holds it."""

    def __init__(self, call: Callable[[], None]) -> None:
        self.error: OSError | None = None
        self.started = time.monotonic()
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], None]) -> None:
        try:
            call()
        except OSError as e:
            self.error = e
        self.seconds = time.monotonic() - self.started

    def finished(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def nvme_connect_as(node: str, nqn: str, source: str) -> str:
    """Connect like the node plugin does (its option string: its host NQN, host id and the kernel's
    default ctrl_loss_tmo / reconnect_delay) from source address `source`; returns the namespace's
    block device (one per controller: nvme_core runs without multipath here)."""
    host_nqn = node_host_nqn(node)
    options = connect_options(nqn, "127.0.0.1", "4420", host_nqn, str(uuid.uuid5(uuid.NAMESPACE_DNS, host_nqn)))
    fd = os.open(FABRICS, os.O_RDWR)
    try:
        os.write(fd, f"{options},host_traddr={source}".encode())
        reply = dict(item.split("=", 1) for item in os.read(fd, 4096).decode().strip().split(","))
    finally:
        os.close(fd)
    device = f"/dev/nvme{reply['instance']}n1"
    wait_until(lambda: os.path.exists(device), 30, device)
    return device


def controller_of(host_nqn: str) -> Path | None:
    for controller in Path("/sys/class/nvme").iterdir():
        if (controller / "hostnqn").read_text().strip() == host_nqn:
            return controller
    return None


def test_unpublish_cuts_the_live_nvme_connection_of_the_removed_node_only(thin_pool: tuple[str, str]) -> None:
    """node-a and node-b connected and writing; unpublish node-a: its next write fails and its
    controller goes away, node-b reconnects by itself and keeps writing; nothing of node-a's lands."""
    vg, pool = thin_pool
    driver, uid = LvmDriver(vg, pool), str(uuid.uuid4())
    backend_id = f"vol-{uid}"
    info = driver.create_volume(backend_id, pool, 64 * MiB, thin=True)
    with nvme_host_without_multipath():
        exporter = NvmetExporter([("127.0.0.1", 4420)])
        try:
            exporter.export(backend_id, info.path, uid, ["node-a", "node-b"])
            nqn = volume_nqn(backend_id)
            device_a = nvme_connect_as("node-a", nqn, "127.0.0.1")
            device_b = nvme_connect_as("node-b", nqn, "127.0.0.2")
            controller_b = controller_of(node_host_nqn("node-b"))
            assert device_a != device_b and controller_b is not None
            assert (controller_b / "ctrl_loss_tmo").read_text().strip() == "600"  # the node plugin's settings
            direct_write(device_a, 0, 0xA0)
            direct_write(device_b, BLOCK, 0xB0)

            exporter.export(backend_id, info.path, uid, ["node-b"])  # unpublish node-a

            write_a = Attempt(lambda: direct_write(device_a, 2 * BLOCK, 0xA1))
            write_b = Attempt(lambda: direct_write(device_b, 3 * BLOCK, 0xB1))
            assert write_a.finished(90), "node-a's write is still held 90 s after the unpublish"
            assert write_a.error is not None, "node-a could still write after it was unpublished"
            assert write_b.finished(90) and write_b.error is None, write_b.error
            print(f"node-a's write failed after {write_a.seconds:.1f} s ({write_a.error.strerror}); "
                  f"node-b's completed after {write_b.seconds:.1f} s")
            wait_until(lambda: controller_of(node_host_nqn("node-a")) is None, 30, "node-a's controller removed")
            assert (controller_b / "state").read_text().strip() == "live"
            direct_write(device_b, 4 * BLOCK, 0xB2)
            seen = [direct_read(device_b, i * BLOCK)[0] for i in range(5)]
            assert seen == [0xA0, 0xB0, 0x00, 0xB1, 0xB2]  # node-a's late write never reached the volume
        finally:
            subprocess.run(["nvme", "disconnect-all"], capture_output=True)
            exporter.unexport(backend_id)
    driver.delete_volume(backend_id, pool)


def _iscsi_login_as(node: str, iqn: str, replacement_timeout: int) -> str:
    """Log in through an iface carrying `node`'s initiator IQN (as the node plugin does); returns its disk."""
    iface, portal = f"e2e-{node}", "127.0.0.1:3260"
    sh("iscsiadm", "-m", "iface", "-I", iface, "-o", "new")
    sh("iscsiadm", "-m", "iface", "-I", iface, "-o", "update", "-n", "iface.initiatorname", "-v", node_iqn(node))
    sh("iscsiadm", "-m", "discovery", "-t", "st", "-p", portal, "-I", iface)
    sh("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-I", iface, "-o", "update",
       "-n", "node.session.timeo.replacement_timeout", "-v", str(replacement_timeout))
    sh("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-I", iface, "--login")
    found: list[str] = []

    def disk() -> bool:
        session = _iscsi_session(node)
        found[:] = glob.glob(f"{session.resolve().parent.parent}/target*/*/block/*") if session else []
        return bool(found)

    wait_until(disk, 30, f"the disk of {node}'s session")
    return f"/dev/{Path(found[0]).name}"


def _iscsi_session(node: str) -> Path | None:
    for session in Path("/sys/class/iscsi_session").iterdir():
        if (session / "initiatorname").read_text().strip() == node_iqn(node):
            return session
    return None


def test_unpublish_cuts_the_live_iscsi_session_of_the_removed_node_only(thin_pool: tuple[str, str]) -> None:
    """Deleting node-a's NodeACL closes its session at once; its writes are held by its initiator and
    never reach the LUN (they fail after its replacement_timeout: 15 s here, 120 s by default), while
    node-b's session is untouched."""
    vg, pool = thin_pool
    driver, uid = LvmDriver(vg, pool), str(uuid.uuid4())
    backend_id = f"vol-{uid}"
    info = driver.create_volume(backend_id, pool, 64 * MiB, thin=True)
    exporter = LioExporter([("127.0.0.1", 3260)], dbroot=Path("/run/opensds-target"))
    try:
        exporter.export(backend_id, info.path, uid, ["node-a", "node-b"])
        device_a = _iscsi_login_as("node-a", volume_iqn(backend_id), replacement_timeout=15)
        device_b = _iscsi_login_as("node-b", volume_iqn(backend_id), replacement_timeout=120)
        direct_write(device_a, 0, 0xA0)
        direct_write(device_b, BLOCK, 0xB0)

        exporter.export(backend_id, info.path, uid, ["node-b"])  # unpublish node-a

        session_a = _iscsi_session("node-a")
        assert session_a is not None
        wait_until(lambda: (session_a / "state").read_text().strip() != "LOGGED_IN", 10, "node-a's session closed")
        write_a = Attempt(lambda: direct_write(device_a, 2 * BLOCK, 0xA1))
        write_b = Attempt(lambda: direct_write(device_b, 3 * BLOCK, 0xB1))
        assert write_b.finished(30) and write_b.error is None, write_b.error
        assert direct_read(info.path, 2 * BLOCK)[0] == 0x00  # held on node-a, not on the LUN
        assert write_a.finished(90), "node-a's write is still held 90 s after the unpublish"
        assert write_a.error is not None, "node-a could still write after it was unpublished"
        print(f"node-a's write failed after {write_a.seconds:.1f} s ({write_a.error.strerror}); "
              f"node-b's completed after {write_b.seconds:.1f} s")
        assert [direct_read(info.path, i * BLOCK)[0] for i in range(4)] == [0xA0, 0xB0, 0x00, 0xB1]
    finally:
        subprocess.run(["iscsiadm", "-m", "node", "--logoutall=all"], capture_output=True)
        for node in ("node-a", "node-b"):
            subprocess.run(["iscsiadm", "-m", "iface", "-I", f"e2e-{node}", "-o", "delete"], capture_output=True)
        exporter.unexport(backend_id)
        driver.delete_volume(backend_id, pool)


def _secret_files(volume: Exported) -> list[Path]:
    if volume.exporter.protocol == "nvmeof-tcp":
        host = CONFIGFS / "hosts" / node_host_nqn("node-a")
        return [host / "dhchap_key", host / "dhchap_ctrl_key"]
    import rtslib_fb

    (target,) = [t for t in rtslib_fb.FabricModule("iscsi").targets if t.wwn == volume_iqn(volume.backend_id)]
    (acl,) = next(iter(target.tpgs)).node_acls
    return [Path(acl.path) / "auth" / name for name in ("password", "password_mutual")]


def test_target_credentials_are_readable_by_root_only_and_generated_ones_authenticate(
        volume: Exported, nodes: tuple[Node, Node]) -> None:
    """configfs makes the key attributes 0644; the exporters chmod them 0600 and it sticks across a
    rotation. The operator's generated Secret (DHHC-1 keys, CHAP pairs) is what the kernels accept."""
    secret = generate_node_stage_secret()
    context = volume.exporter.export(volume.backend_id, volume.device, volume.uid, ["node-a"],
                                     ExportAuth.from_secret(secret))
    assert context["auth"] in ("dhchap-bidirectional", "chap-mutual")
    for path in _secret_files(volume):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    rotated = generate_node_stage_secret()
    volume.exporter.export(volume.backend_id, volume.device, volume.uid, ["node-a"], ExportAuth.from_secret(rotated))
    for path in _secret_files(volume):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    node_a, _ = nodes
    target = stage(node_a, volume.backend_id, context, capability(None), secrets=rotated)
    write_at(target, 0, b"authenticated")
    assert read_at(target, 0, 13) == b"authenticated"
    unstage(node_a, volume.backend_id)
