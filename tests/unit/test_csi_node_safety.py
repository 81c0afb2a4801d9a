"""The node plugin's data-safety decisions: what it formats, what publish_context it accepts,
how secrets reach the kernel and tools, deadlines, and its state records.

Pure decision functions are tested directly; anything touching files or processes uses real
files and real processes in a temporary directory. Only run() is captured (never executed)
where a connector would drive nvme/iscsiadm against a kernel this host lacks.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opensds_csi import mounts
from opensds_csi.connectors import Connectors, iscsi, nvme_tcp
from opensds_csi.connectors.local import LocalConnector, is_lvm_volume
from opensds_csi.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from opensds_csi.mounts import Probe, filesystem_to_mount
from opensds_csi.node import checked_connector
from opensds_csi.nodestate import CorruptState, NodeState, StagedVolume
from opensds_csi.run import CommandFailed, run
from opensds_operator.api import (
    CTX_ADDRESSES,
    CTX_AUTH,
    CTX_IQN,
    CTX_NQN,
    CTX_PATH,
    CTX_PORTALS,
    CTX_SERIAL,
    CTX_TRANSPORT,
    CTX_UUID,
    VC_ACCESS_PROTOCOL,
    VC_VOLUME_UID,
)
from opensds_operator.exports.base import volume_iqn, volume_nqn

from ..testenv import free_loop_device

UID = "0b6f6c2e-8d0a-4c59-9d1e-3f1f2a7c9e01"
OTHER_UID = "7d3c1b2a-1111-4222-8333-944455556666"


# ------------------------------------------------------------------ formatting (item 2)

@pytest.mark.parametrize(("found", "named"), [
    (Probe(0, {"PTTYPE": "gpt", "PTUUID": "x"}), "partition table (PTTYPE=gpt)"),
    (Probe(0, {"PTTYPE": "dos"}), "PTTYPE=dos"),
    (Probe(0, {"TYPE": "LVM2_member", "USAGE": "raid"}), "LVM2_member"),
    (Probe(0, {"TYPE": "crypto_LUKS", "USAGE": "crypto"}), "crypto_LUKS"),
    (Probe(0, {"UUID": "1234"}), "UUID=1234"),
    (Probe(8, {}), "ambiguous"),
    (Probe(2, {}, "error: /dev/sdz: Input/output error", zeroed=True), "Input/output error"),
    (Probe(4, {}, "", zeroed=True), "blkid exit 4"),
    (Probe(2, {}, "", zeroed=False), "holds data"),
])
def test_anything_but_a_provably_blank_device_is_refused_not_formatted(found: Probe, named: str) -> None:
    with pytest.raises(FailedPrecondition) as refused:
        filesystem_to_mount("/dev/x", found)
    assert named in refused.value.message and "/dev/x" in refused.value.message


def test_only_no_signature_and_zeroed_ends_count_as_blank() -> None:
    assert filesystem_to_mount("/dev/x", Probe(2, {}, "", zeroed=True)) is None


def test_an_existing_filesystem_is_mounted_as_it_is() -> None:
    assert filesystem_to_mount("/dev/x", Probe(0, {"TYPE": "xfs", "USAGE": "filesystem"})) == "xfs"
    assert filesystem_to_mount("/dev/x", Probe(0, {"TYPE": "ext4", "PTTYPE": "dos"})) == "ext4"


def test_a_missing_device_is_never_taken_for_a_blank_one(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as refused:  # blkid exits 2, silently, for a missing path
        mounts.detect_filesystem(str(tmp_path / "gone"))
    assert "No such file" in refused.value.message


def test_a_regular_file_is_not_a_device_to_format(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(4096))
    with pytest.raises(FailedPrecondition, match="not a block device"):
        mounts.detect_filesystem(str(image))


# ------------------------------------------------------------------ trusting publish_context (item 6)

@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "backend", tmp_path / "elsewhere"
    (root / "volumes").mkdir(parents=True)
    outside.mkdir()
    return root, outside


def _image(path: Path, mode: int = 0o600) -> Path:
    path.write_bytes(bytes(4096))
    path.chmod(mode)
    return path


def _local(path: Path | str) -> dict[str, str]:
    return {CTX_TRANSPORT: "local", CTX_PATH: str(path)}


def test_a_volume_image_under_a_local_root_is_accepted(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    image = _image(root / "volumes" / f"vol-{UID}.img")
    assert LocalConnector([str(root)]).checked_path("ns/v", _local(image)) == str(image)


def test_host_files_and_paths_outside_the_roots_are_refused(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    connector = LocalConnector([str(root)])
    shadow = _image(outside / "shadow")
    (root / "volumes" / f"vol-{UID}.img").symlink_to(shadow)  # a link out of the root
    _image(outside / f"vol-{UID}.img")
    (root / "volumes" / "vol-x.img").symlink_to(root / "volumes" / f"vol-{UID}.img")
    refused: list[tuple[dict[str, str], type[Exception]]] = [
        (_local("/etc/shadow"), InvalidArgument),
        (_local(shadow), InvalidArgument),
        (_local(root / "volumes" / f"vol-{UID}.img"), FailedPrecondition),
        (_local(outside / f"vol-{UID}.img"), FailedPrecondition),
        (_local(root / "volumes" / ".." / ".." / "elsewhere" / f"vol-{UID}.img"), FailedPrecondition),
        (_local(root / "volumes" / "vol-x.img"), InvalidArgument),
        (_local(root / "volumes" / "vol-.img"), InvalidArgument),
        ({CTX_TRANSPORT: "local"}, InvalidArgument),
    ]
    for context, kind in refused:
        with pytest.raises(kind):
            connector.checked_path("ns/v", context)


def test_an_image_others_may_write_is_refused(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    image = _image(root / "volumes" / f"vol-{UID}.img", 0o666)
    os.chmod(image, 0o666)
    with pytest.raises(FailedPrecondition, match="writable by group or others"):
        LocalConnector([str(root)]).checked_path("ns/v", _local(image))


def test_a_block_device_must_be_the_lvm_volume_of_that_name() -> None:
    assert is_lvm_volume("vg0", f"vol-{UID}", f"vg0-vol--{UID.replace('-', '--')}", "LVM-abc")
    assert is_lvm_volume("my-vg", "vol-1", "my--vg-vol--1", "LVM-abc")
    assert not is_lvm_volume("vg0", f"vol-{UID}", f"vg0-vol--{UID.replace('-', '--')}", "CRYPT-LUKS2-x")
    assert not is_lvm_volume("vg0", f"vol-{UID}", "vg0-root", "LVM-abc")
    assert not is_lvm_volume("vg0", f"vol-{UID}", "", "")


def test_a_loop_device_is_not_accepted_as_a_local_block_volume(tmp_path: Path) -> None:
    loop = free_loop_device()  # root and /dev/loop-control, or a failure naming them (no skip)
    link = tmp_path / "dev" / "vg0" / f"vol-{UID}"
    link.parent.mkdir(parents=True)
    link.symlink_to(loop)
    with pytest.raises(FailedPrecondition, match="not an LVM volume path"):
        LocalConnector([str(tmp_path)]).checked_path("ns/v", _local(link))


def test_the_transport_must_be_the_profiles_and_the_uid_the_volumes(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    connectors = Connectors("node-1", [str(root)])
    context = _local(root / "volumes" / f"vol-{UID}.img")
    recorded = {VC_ACCESS_PROTOCOL: "local", VC_VOLUME_UID: UID}
    assert checked_connector(connectors, "ns/v", context, recorded)[0] == "local"
    assert checked_connector(connectors, "ns/v", context, {})[0] == "local"  # PVs from before: context alone
    with pytest.raises(FailedPrecondition, match="accessProtocol iscsi"):
        checked_connector(connectors, "ns/v", context, {VC_ACCESS_PROTOCOL: "iscsi"})
    with pytest.raises(FailedPrecondition, match=f"names volume {UID}, but the volume is {OTHER_UID}"):
        checked_connector(connectors, "ns/v", context, {VC_VOLUME_UID: OTHER_UID})
    with pytest.raises(InvalidArgument, match="transport"):
        checked_connector(connectors, "ns/v", {CTX_PATH: context[CTX_PATH]}, {})


def _nvme_context(uid: str = UID, nqn: str | None = None) -> dict[str, str]:
    return {CTX_TRANSPORT: "nvmeof-tcp", CTX_NQN: nqn or volume_nqn(f"vol-{uid}"), CTX_UUID: uid,
            CTX_ADDRESSES: "127.0.0.1:4420"}


def _iscsi_context(uid: str = UID, iqn: str | None = None) -> dict[str, str]:
    return {CTX_TRANSPORT: "iscsi", CTX_IQN: iqn or volume_iqn(f"vol-{uid}"), CTX_SERIAL: uid,
            CTX_PORTALS: "127.0.0.1:3260"}


def test_network_identities_must_be_full_uids_of_this_volumes_target() -> None:
    connectors = Connectors("node-1")
    nvme, scsi = connectors.get("nvmeof-tcp"), connectors.get("iscsi")
    assert nvme.volume_uid("ns/v", _nvme_context()) == UID
    assert scsi.volume_uid("ns/v", _iscsi_context()) == UID
    for bad in ({**_nvme_context(), CTX_UUID: ""}, {**_nvme_context(), CTX_UUID: UID[:8]},
                _nvme_context(nqn=volume_nqn(f"vol-{OTHER_UID}")), _nvme_context(nqn="nqn.2014-08.org.host:boot")):
        with pytest.raises(InvalidArgument):
            nvme.volume_uid("ns/v", bad)
    for bad in ({**_iscsi_context(), CTX_SERIAL: ""}, {**_iscsi_context(), CTX_SERIAL: UID.upper()},
                _iscsi_context(iqn=volume_iqn(f"vol-{OTHER_UID}"))):
        with pytest.raises(InvalidArgument):
            scsi.volume_uid("ns/v", bad)
    rbd = connectors.get("rbd")
    assert rbd.volume_uid("ns/v", {"image": f"vol-{UID}"}) == UID
    for image in ("", "vol-", "snap-" + UID, f"vol-{UID}x"):
        with pytest.raises(InvalidArgument):
            rbd.volume_uid("ns/v", {"image": image})


def test_an_nvme_namespace_matches_only_its_exact_uuid() -> None:
    own = {"uuid": UID, "nguid": UID, "wwid": f"uuid.{UID}"}
    assert nvme_tcp.namespace_matches(own, UID)
    assert nvme_tcp.namespace_matches({"nguid": UID.replace("-", "")}, UID)
    assert nvme_tcp.namespace_matches({"wwid": "eui." + UID.replace("-", "")}, UID)
    host_disk = {"uuid": "00000000-0000-0000-0000-000000000000", "nguid": "", "wwid": "eui.0025388b91b2c7a1"}
    assert not nvme_tcp.namespace_matches(host_disk, "")
    assert not nvme_tcp.namespace_matches(own, UID[:8])
    assert not nvme_tcp.namespace_matches({"wwid": f"uuid.{UID}-extra"}, UID)
    assert nvme_tcp.find_namespace("") is None


def test_an_iscsi_disk_matches_only_its_exact_unit_serial() -> None:
    page = bytes([0, 0x80, 0, len(UID) + 1]) + UID.encode() + b"\0"
    assert iscsi.unit_serial(page) == UID
    assert iscsi.unit_serial(b"") == "" and iscsi.unit_serial(bytes([0, 0x83, 0, 1, 65])) == ""
    assert iscsi.find_disks("") == []


# ------------------------------------------------------------------ secrets never in argv (item 10)

DHCHAP_HOST = "DHHC-1:00:" + "A" * 44 + ":"
DHCHAP_CTRL = "DHHC-1:00:" + "B" * 44 + ":"


class Recorder:
    """Stands in for run(): records every argv, runs nothing; `fail` makes matching calls fail."""

    def __init__(self, fail: str = "", on_new: Any = None) -> None:
        self.calls: list[list[str]] = []
        self.fail, self.on_new = fail, on_new

    def __call__(self, *args: str, **_: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(args))
        if self.on_new and "new" in args and "node" in args:
            self.on_new(args)
        if self.fail and self.fail in args:
            raise CommandFailed(list(args), 24, "iscsiadm: Login failed (authorization failure)")
        return subprocess.CompletedProcess(list(args), 0, "", "")


def test_dhchap_secrets_go_to_the_kernel_never_onto_a_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fabrics = tmp_path / "nvme-fabrics"  # a file stands in for the kernel's /dev/nvme-fabrics
    fabrics.write_bytes(b"")
    recorder = Recorder()
    monkeypatch.setattr(nvme_tcp, "FABRICS", fabrics)
    monkeypatch.setattr(nvme_tcp, "run", recorder)
    monkeypatch.setattr(nvme_tcp, "find_namespace", lambda uid: "/dev/nvme9n1" if uid == UID else None)
    connector = nvme_tcp.NvmeTcpConnector("node-1")
    device = connector.attach("ns/v", {**_nvme_context(), CTX_AUTH: "dhchap-bidirectional"},
                              {"dhchapHostKey": DHCHAP_HOST, "dhchapCtrlKey": DHCHAP_CTRL})
    assert device == "/dev/nvme9n1"
    assert not any(DHCHAP_HOST in arg or DHCHAP_CTRL in arg for call in recorder.calls for arg in call)
    written = fabrics.read_text()
    assert f"dhchap_secret={DHCHAP_HOST}" in written and f"dhchap_ctrl_secret={DHCHAP_CTRL}" in written
    assert f"nqn={volume_nqn(f'vol-{UID}')}," in written and "hostnqn=" in written


def test_a_connect_option_cannot_be_smuggled_in_through_a_value() -> None:
    with pytest.raises(InvalidArgument):
        nvme_tcp.connect_options("nqn.x,hostnqn=evil", "127.0.0.1", "4420", "nqn.h", UID)
    with pytest.raises(InvalidArgument):
        nvme_tcp.connect_options("nqn.x", "127.0.0.1", "4420", "nqn.h", UID, "DHHC-1:00:QQ==:,duplicate_connect")


def test_chap_credentials_go_into_a_private_node_record_never_onto_a_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "nodes"
    iqn = volume_iqn(f"vol-{UID}")

    def new_record(args: tuple[str, ...]) -> None:  # what `iscsiadm -m node -o new` leaves behind
        target = db / iqn
        target.mkdir(parents=True, mode=0o700, exist_ok=True)
        _image(target / "127.0.0.1,3260").write_text(
            "# BEGIN RECORD 2.1.8\nnode.name = x\nnode.session.auth.authmethod = None\n"
            "node.session.auth.chap_algs = MD5\n# END RECORD\n")

    recorder = Recorder(fail="--login", on_new=new_record)
    monkeypatch.setattr(iscsi, "run", recorder)
    monkeypatch.setattr(iscsi, "NODE_DBS", (db,))
    secrets = {"chapUser": "node-a", "chapPassword": "Initiator-pw-1", "chapMutualUser": "target",
               "chapMutualPassword": "Target-pw-123"}
    with pytest.raises(FailedPrecondition) as refused:
        iscsi.IscsiConnector("node-1").attach("ns/v", {**_iscsi_context(), CTX_AUTH: "chap-mutual"}, secrets)
    assert not any(secret in arg for call in recorder.calls for arg in call for secret in secrets.values())
    assert "Initiator-pw-1" not in refused.value.message
    record = db / iqn / "127.0.0.1,3260"
    text = record.read_text()
    assert "node.session.auth.password = Initiator-pw-1" in text and "node.session.auth.authmethod = CHAP" in text
    assert "node.session.auth.password_in = Target-pw-123" in text and "authmethod = None" not in text
    assert text.index("password_in") < text.index("# END RECORD") and "chap_algs = MD5" in text
    assert record.stat().st_mode & 0o077 == 0 and (db / iqn).stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in (db / iqn).iterdir()) == ["127.0.0.1,3260"]  # no temporary left


def test_a_chap_value_cannot_add_lines_to_the_node_record() -> None:
    with pytest.raises(InvalidArgument):
        iscsi.with_auth("# END RECORD\n", [("node.session.auth.password", "pw\nnode.startup = automatic")])


# ------------------------------------------------------------------ deadlines (robustness)

def test_a_hung_command_is_killed_with_its_children_and_reported_as_deadline_exceeded(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as expired:
        run("sh", "-c", f"sleep 60 & echo $! > {marker}; wait", timeout=0.5)
    assert time.monotonic() - started < 10
    assert "did not finish within 0.5 s" in expired.value.message and expired.value.code_name == "DEADLINE_EXCEEDED"
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "Z" in _state(child)  # the whole group got SIGKILL


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_a_call_that_does_not_answer_is_abandoned_and_not_piled_up() -> None:
    release = threading.Event()
    started = time.monotonic()
    assert mounts.bounded("dead", release.wait, timeout=0.3) is None
    assert mounts.bounded("dead", lambda: True, timeout=5) is None  # the first is still stuck: no second thread
    assert time.monotonic() - started < 2
    release.set()
    deadline = time.monotonic() + 5
    while mounts.bounded("dead", lambda: True, timeout=1) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mounts.bounded("dead", lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        mounts.bounded("boom", lambda: 1 // 0)


# ------------------------------------------------------------------ node state (robustness)

def _staged(volume_id: str = "ns/v") -> StagedVolume:
    return StagedVolume(volume_id=volume_id, transport="local", context={}, device="/dev/loop9",
                        staging_path="/staging", access_type="mount", fs_type="ext4")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[NodeState]:
    yield NodeState(str(tmp_path / "state"))


def test_a_corrupt_record_is_reported_as_such_and_set_aside(state: NodeState) -> None:
    state.save(_staged("ns/a"))
    state.save(_staged("ns/b"))
    state._file("ns/a").write_text('{"volume_id": "ns/a", "transp')  # what a torn write would leave
    with pytest.raises(CorruptState):
        state.get("ns/a")
    assert [v.volume_id for v in state.all()] == ["ns/b"]
    kept = state.set_aside("ns/a")
    assert kept.exists() and state.get("ns/a") is None


def test_a_record_of_unknown_shape_is_corrupt_not_a_crash(state: NodeState) -> None:
    state._file("ns/a").write_text('{"volume_id": "ns/a", "unexpected": 1}')
    with pytest.raises(CorruptState):
        state.get("ns/a")
    state._file("ns/a").write_bytes(b"\xff\xfe")
    with pytest.raises(CorruptState):
        state.get("ns/a")


def test_saves_are_whole_and_leave_no_temporaries(state: NodeState) -> None:
    for i in range(20):
        volume = _staged()
        volume.targets = {f"/t{j}": False for j in range(i)}
        state.save(volume)
    assert sorted(p.name for p in state.dir.iterdir()) == [state._file("ns/v").name]
    assert len(state.get("ns/v").targets) == 19  # type: ignore[union-attr]
    assert state.dir.stat().st_mode & 0o077 == 0


def test_a_save_interrupted_by_a_crash_leaves_the_previous_record(tmp_path: Path) -> None:
    """A writer SIGKILLed at random points: every survivor record parses (old or new), no temporaries stay."""
    directory = tmp_path / "state"
    NodeState(str(directory)).save(_staged())
    script = ("import sys; from opensds_csi.nodestate import NodeState, StagedVolume\n"
              f"s = NodeState({str(directory)!r})\n"
              "i = 0\n"
              "while True:\n"
              "    i += 1\n"
              "    s.save(StagedVolume('ns/v', 'local', {'k': 'x' * 4096}, '/dev/loop9', '/staging', 'mount',\n"
              "                        targets={f'/t{j}': False for j in range(i % 50)}))\n")
    for delay in (0.2, 0.35, 0.5, 0.7):
        writer = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(delay)
        writer.kill()
        writer.wait()
        state = NodeState(str(directory))  # a restarted plugin
        assert state.get("ns/v") is not None
        assert not list(directory.glob("*.tmp"))


def test_unique_volume_ids_get_distinct_records(state: NodeState) -> None:
    ids = [f"ns/{uuid.uuid4()}" for _ in range(5)]
    for volume_id in ids:
        state.save(_staged(volume_id))
    assert sorted(v.volume_id for v in state.all()) == sorted(ids)
