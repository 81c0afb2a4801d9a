"""Transport `iscsi`: iscsiadm login through an iface carrying this node's initiator IQN; the disk
is found by the unit serial the dock set (the volume UUID), waiting for udev up to a deadline.

A dedicated iface (`opensds`) keeps the node's own /etc/iscsi/initiatorname.iscsi untouched.
Several portals mean several sessions, hence one SCSI disk per path for the same LUN: those are
joined by dm-multipath (`multipath.py`), and the node uses the map, never one of the paths.
An export with `auth: chap*` needs chapUser/chapPassword (and chapMutualUser/chapMutualPassword)
from the node-stage secrets. iscsiadm only takes settings as `-v <value>` arguments, which
/proc/<pid>/cmdline shows to every local user, so the credentials are written straight into
the node record iscsiadm made (`-o new`): a 0600 file in open-iscsi's 0700 node database,
replaced atomically, read by `iscsiadm --login`, and deleted with the record on detach.

Only this volume's target (`volume_iqn(vol-<uid>)`) is logged into, and only a disk whose unit
serial is exactly the volume UID is taken (an empty or partial serial matches nothing).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyudev

from opensds_operator.api import (
    CHAP_MUTUAL_PASSWORD,
    CHAP_MUTUAL_USER,
    CHAP_PASSWORD,
    CHAP_USER,
    CTX_AUTH,
    CTX_IQN,
    CTX_PORTALS,
    CTX_SERIAL,
    CTX_TRANSPORT,
    valid_uid,
    volume_backend_id,
)
from opensds_operator.exports.base import node_iqn, volume_iqn

from ..errors import FailedPrecondition, InvalidArgument
from ..run import CommandFailed, run
from . import multipath
from .base import context_field, require_uid, sys_block, wait_for_device

IFACE = "opensds"
NODE_DBS = (Path("/etc/iscsi/nodes"), Path("/var/lib/iscsi/nodes"))  # Debian's, then Red Hat's
AUTH_KEYS = ("node.session.auth.authmethod", "node.session.auth.username", "node.session.auth.password",
             "node.session.auth.username_in", "node.session.auth.password_in")


def unit_serial(vpd_pg80: bytes) -> str:
    """The unit serial number in a raw VPD page 0x80 (4-byte header, then `length` bytes)."""
    if len(vpd_pg80) < 4 or vpd_pg80[1] != 0x80:
        return ""
    length = int.from_bytes(vpd_pg80[2:4], "big")
    return vpd_pg80[4:4 + length].decode("ascii", errors="replace").strip("\0 \t\n")


def find_disks(serial: str) -> list[str]:
    """The SCSI disks (one per path) whose unit serial (VPD page 0x80) is exactly this serial."""
    if not valid_uid(serial):
        return []  # an empty or partial serial matches nothing
    found = []
    for device in pyudev.Context().list_devices(subsystem="block", DEVTYPE="disk"):
        vpd = Path(device.sys_path) / "device" / "vpd_pg80"
        try:
            if unit_serial(vpd.read_bytes()) == serial:
                found.append(str(device.device_node))
        except OSError:
            continue
    return sorted(found)


def node_records(iqn: str, portal: str, iface: str, dbs: Sequence[Path] | None = None) -> list[Path]:
    """The node record files iscsiadm keeps for target iqn at portal through iface.

    open-iscsi stores `<db>/<iqn>/<host>,<port>` (a file, target portal group not known yet)
    or `<db>/<iqn>/<host>,<port>,<tpgt>/<iface>` (after discovery or login).
    """
    host, _, port = portal.rpartition(":")
    names = {f"{host},{port}", f"{host.strip('[]')},{port}"}
    found = []
    for db in NODE_DBS if dbs is None else dbs:
        target = db / iqn
        if not target.is_dir():
            continue
        for entry in sorted(target.iterdir()):
            if entry.name in names or any(entry.name.startswith(n + ",") for n in names):
                record = entry / iface if entry.is_dir() else entry
                if record.is_file():
                    found.append(record)
    return found


def with_auth(record: str, settings: Sequence[tuple[str, str]]) -> str:
    """A node record's text with its CHAP settings replaced by `settings`."""
    for name, value in settings:
        if any(c in value for c in "\n\r\0") or not value:
            raise InvalidArgument(f"node-stage secret for {name.rsplit('.', 1)[-1]} is empty or spans lines")
    lines = [line for line in record.splitlines() if line.split("=", 1)[0].strip() not in AUTH_KEYS]
    ours = [f"{name} = {value}" for name, value in settings]
    end = next((i for i, line in enumerate(lines) if line.startswith("# END RECORD")), len(lines))
    return "\n".join(lines[:end] + ours + lines[end:]) + "\n"


def write_auth(record: Path, settings: Sequence[tuple[str, str]]) -> None:
    """Put CHAP settings into a node record: a 0600 temporary beside it, fsync, atomic rename."""
    text = with_auth(record.read_text(), settings)
    fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".opensds-")  # 0600 from the start
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, record)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def find_disk(serial: str) -> str | None:
    disks = find_disks(serial)
    return disks[0] if disks else None


def find_multipath(serial: str, paths: int) -> str | None:
    """Once every path's disk is there, the multipath map over them (made if missing)."""
    disks = find_disks(serial)
    return multipath.assemble(disks) if len(disks) >= paths else None


class IscsiConnector:
    def __init__(self, node_id: str) -> None:
        self.initiator = node_iqn(node_id)

    def _iface(self) -> None:
        run("iscsiadm", "-m", "iface", "-I", IFACE, "-o", "new", ok_codes=(0, 15))  # 15: exists
        run("iscsiadm", "-m", "iface", "-I", IFACE, "-o", "update", "-n", "iface.initiatorname", "-v", self.initiator)

    def volume_uid(self, volume_id: str, context: Mapping[str, str]) -> str:
        uid = require_uid(volume_id, "unit serial", context.get(CTX_SERIAL))
        iqn = context_field(volume_id, context, CTX_IQN)
        if iqn != volume_iqn(volume_backend_id(uid)):
            raise InvalidArgument(f"publish_context of {volume_id}: target {iqn!r} is not the target of volume "
                                  f"{uid} ({volume_iqn(volume_backend_id(uid))})")
        return uid

    def _fields(self, volume_id: str, context: Mapping[str, str]) -> tuple[str, list[str], str]:
        serial = self.volume_uid(volume_id, context)
        portals = [p for p in context_field(volume_id, context, CTX_PORTALS).split(",") if p]
        return context[CTX_IQN], portals, serial

    @staticmethod
    def _chap(volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> list[tuple[str, str]]:
        """node.session.auth settings for a CHAP export (empty for an open one)."""
        mode = context.get(CTX_AUTH, "")
        if not mode.startswith("chap"):
            return []
        mutual = mode == "chap-mutual"
        wanted = [CHAP_USER, CHAP_PASSWORD] + ([CHAP_MUTUAL_USER, CHAP_MUTUAL_PASSWORD] if mutual else [])
        missing = [k for k in wanted if not secrets.get(k)]
        if missing:
            raise InvalidArgument(f"volume {volume_id} is exported with CHAP: node-stage secrets need "
                                  f"{', '.join(missing)} (the StorageProfile's nodeStageSecretRef)")
        settings = [("node.session.auth.authmethod", "CHAP"), ("node.session.auth.username", secrets[CHAP_USER]),
                    ("node.session.auth.password", secrets[CHAP_PASSWORD])]
        if mutual:
            settings += [("node.session.auth.username_in", secrets[CHAP_MUTUAL_USER]),
                         ("node.session.auth.password_in", secrets[CHAP_MUTUAL_PASSWORD])]
        return settings

    def attach(self, volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
        iqn, portals, serial = self._fields(volume_id, context)
        disks = find_disks(serial)
        existing = multipath.map_over(disks) if len(portals) > 1 else (disks[0] if disks else None)
        if existing:
            return existing
        self._iface()
        errors = []
        chap = self._chap(volume_id, context, secrets)
        for portal in portals:
            base = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-I", IFACE]
            try:
                run(*base, "-o", "new")
                if chap:
                    records = node_records(iqn, portal, IFACE)
                    if not records:
                        raise FailedPrecondition(f"iscsiadm made no node record for {iqn} at {portal} under "
                                                 f"{', '.join(map(str, NODE_DBS))}; cannot set CHAP credentials")
                    for record in records:
                        write_auth(record, chap)
                run(*base, "--login", ok_codes=(0, 15), secrets=[v for _, v in chap])  # 15: session exists
            except CommandFailed as e:
                errors.append(f"{portal}: {e.stderr.strip()}")
        if len(portals) > 1:
            run("modprobe", "dm-multipath", ok_codes=(0, 1))  # multipathd would load it; we may be first
            up = len(portals) - len(errors)
            device = wait_for_device(lambda: find_multipath(serial, up), any_path_up=up > 0)
        else:
            device = wait_for_device(lambda: find_disk(serial), any_path_up=not errors)
        if device:
            return device
        paths = find_disks(serial)
        self.detach(volume_id, context, None)
        if len(portals) > 1 and paths:
            raise FailedPrecondition(f"volume {volume_id}: {len(paths)} path disk(s) {', '.join(paths)} appeared but "
                                     f"no dm-multipath map over them; are multipath-tools and dm-multipath there?")
        raise FailedPrecondition(f"volume {volume_id}: no disk with serial {serial} appeared for initiator "
                                 f"{self.initiator} ({'; '.join(errors) or 'logged in, but no disk'}); "
                                 f"is the volume published to this node?")

    def detach(self, volume_id: str, context: Mapping[str, str], device: str | None) -> None:
        iqn = context.get(CTX_IQN)
        if not iqn:
            return
        if device and Path(device).exists():
            run("blockdev", "--flushbufs", device, ok_codes=(0, 1))
        serial = context.get(CTX_SERIAL, "")
        maps = {multipath.map_over(find_disks(serial)) if serial else None,
                device if multipath.is_map(device) else None}
        for mpath in sorted(m for m in maps if m):
            multipath.remove(mpath)  # before its paths go away under it
        run("iscsiadm", "-m", "node", "-T", iqn, "-I", IFACE, "--logout", ok_codes=(0, 21))  # 21: no session
        run("iscsiadm", "-m", "node", "-T", iqn, "-I", IFACE, "-o", "delete", ok_codes=(0, 21))

    def refresh(self, device: str) -> None:
        """Rescan every path disk; a multipath map is then reloaded at the paths' new size."""
        block = sys_block(device)
        for path in sorted((block / "slaves").glob("*")) or [block]:
            rescan = path / "device" / "rescan"
            if rescan.exists():
                rescan.write_text("1")
        if multipath.is_map(device):
            multipath.reload(device)

    def identify(self, device: str) -> dict[str, str] | None:
        """Target and serial of an iSCSI disk, or of the first path under a multipath map."""
        block = sys_block(device)
        paths = sorted((block / "slaves").glob("*")) if multipath.is_map(device) else [block]
        for path in paths:
            disk = Path("/sys/block") / path.name
            session = next((p for p in disk.joinpath("device").resolve().parts if p.startswith("session")), None)
            if session is None:
                continue
            try:
                iqn = Path(f"/sys/class/iscsi_session/{session}/targetname").read_text().strip()
                serial = unit_serial((disk / "device" / "vpd_pg80").read_bytes())
            except OSError:
                continue
            if iqn.startswith(volume_iqn("vol-")):
                return {CTX_TRANSPORT: "iscsi", CTX_IQN: iqn, CTX_SERIAL: serial}
        return None
