"""Transport `iscsi`: iscsiadm login through an iface carrying this node's initiator IQN; the disk
is found by the unit serial the dock set (the volume UUID), waiting for udev up to a deadline.

A dedicated iface (`opensds`) keeps the node's own /etc/iscsi/initiatorname.iscsi untouched.
Several portals mean several sessions, hence one SCSI disk per path for the same LUN: those are
joined by dm-multipath (multipath-tools: the WWID is added to its wwids file and the map made
with `multipath`; multipathd, when it runs, keeps paths checked and reinstated), and the node
uses the map, never one of the paths. An export with `auth: chap*` needs chapUser/chapPassword (and
chapMutualUser/chapMutualPassword) from the node-stage secrets; they go into the node record.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import pyudev

from opensds_operator.exports.base import (
    CHAP_MUTUAL_PASSWORD,
    CHAP_MUTUAL_USER,
    CHAP_PASSWORD,
    CHAP_USER,
    node_iqn,
)

from ..errors import FailedPrecondition, InvalidArgument
from ..run import CommandFailed, run
from .base import wait_for_device

IFACE = "opensds"


def find_disks(serial: str) -> list[str]:
    """The SCSI disks (one per path) whose VPD page 0x80 (unit serial) carries this serial."""
    found = []
    for device in pyudev.Context().list_devices(subsystem="block", DEVTYPE="disk"):
        vpd = Path(device.sys_path) / "device" / "vpd_pg80"
        try:
            if serial.encode() in vpd.read_bytes():
                found.append(str(device.device_node))
        except OSError:
            continue
    return sorted(found)


def find_disk(serial: str) -> str | None:
    disks = find_disks(serial)
    return disks[0] if disks else None


def multipath_map(disks: list[str]) -> str | None:
    """The dm-multipath device holding these path disks, if one does."""
    for disk in disks:
        for holder in sorted((Path("/sys/block") / Path(disk).name / "holders").glob("dm-*")):
            if (holder / "dm" / "uuid").read_text().startswith("mpath-"):
                return f"/dev/{holder.name}"
    return None


def find_multipath(serial: str, paths: int) -> str | None:
    """Once every path's disk is there, the multipath map over them (made if missing)."""
    disks = find_disks(serial)
    if len(disks) < paths:
        return None
    existing = multipath_map(disks)
    if existing is None:
        run("multipath", "-a", disks[0], ok_codes=(0, 1))  # whitelist the WWID (find_multipaths)
        run("multipath", disks[0], ok_codes=(0, 1))
    elif _slaves(existing) < {Path(d).name for d in disks}:
        run("multipath", "-r", existing, ok_codes=(0, 1))  # a path udev had not finished with: add it
    existing = multipath_map(disks)
    # Only a map over every path counts: one made before udev finished with a disk lacks it.
    return existing if existing and _slaves(existing) >= {Path(d).name for d in disks} else None


def _is_multipath(device: str | None) -> bool:
    uuid = Path("/sys/block") / Path(device or "-").name / "dm" / "uuid"
    return uuid.exists() and uuid.read_text().startswith("mpath-")


def _remove_map(device: str, attempts: int = 20) -> None:
    """Flush and remove a multipath map, retrying while udev or blkid still hold it briefly.

    A map left behind after logout would have no paths and queue I/O forever, so failing here
    (NodeUnstage is retried) beats logging out under it.
    """
    block = Path("/sys/block") / Path(device).name
    try:
        name = (block / "dm" / "name").read_text().strip()  # the map's name (its WWID)
    except FileNotFoundError:
        return
    run("dmsetup", "message", name, "0", "fail_if_no_path", ok_codes=(0, 1))
    for _ in range(attempts):
        run("multipath", "-f", name, ok_codes=(0, 1))
        if not block.exists():
            return
        time.sleep(0.25)
    raise FailedPrecondition(f"multipath map {device} is still in use; not logging out its paths")


def _slaves(device: str) -> set[str]:
    return {p.name for p in (Path("/sys/block") / Path(device).name / "slaves").iterdir()}


class IscsiConnector:
    def __init__(self, node_id: str) -> None:
        self.initiator = node_iqn(node_id)

    def _iface(self) -> None:
        run("iscsiadm", "-m", "iface", "-I", IFACE, "-o", "new", ok_codes=(0, 15))  # 15: exists
        run("iscsiadm", "-m", "iface", "-I", IFACE, "-o", "update", "-n", "iface.initiatorname", "-v", self.initiator)

    @staticmethod
    def _fields(volume_id: str, context: Mapping[str, str]) -> tuple[str, list[str], str]:
        try:
            return context["iqn"], [p for p in context["portals"].split(",") if p], context["serial"]
        except KeyError as e:
            raise InvalidArgument(f"publish_context of {volume_id} lacks {e.args[0]!r}") from None

    @staticmethod
    def _chap(volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> list[tuple[str, str]]:
        """node.session.auth settings for a CHAP export (empty for an open one)."""
        mode = context.get("auth", "")
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
        existing = multipath_map(disks) if len(portals) > 1 else (disks[0] if disks else None)
        if existing:
            return existing
        self._iface()
        errors = []
        chap = self._chap(volume_id, context, secrets)
        for portal in portals:
            base = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-I", IFACE]
            try:
                run(*base, "-o", "new")
                for name, value in chap:
                    run(*base, "-o", "update", "-n", name, "-v", value, secrets=[v for _, v in chap])
                run(*base, "--login", ok_codes=(0, 15))  # 15: session exists
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
        iqn = context.get("iqn")
        if not iqn:
            return
        if device and Path(device).exists():
            run("blockdev", "--flushbufs", device, ok_codes=(0, 1))
        serial = context.get("serial", "")
        maps = {multipath_map(find_disks(serial)) if serial else None, device if _is_multipath(device) else None}
        for mpath in sorted(m for m in maps if m):
            _remove_map(mpath)  # before its paths go away under it
        run("iscsiadm", "-m", "node", "-T", iqn, "-I", IFACE, "--logout", ok_codes=(0, 21))  # 21: no session
        run("iscsiadm", "-m", "node", "-T", iqn, "-I", IFACE, "-o", "delete", ok_codes=(0, 21))

    def refresh(self, device: str) -> None:
        """Rescan every path disk; a multipath map is then reloaded at the paths' new size."""
        block = Path("/sys/block") / Path(device).resolve().name
        paths = sorted((block / "slaves").glob("*")) or [block]
        for path in paths:
            rescan = path / "device" / "rescan"
            if rescan.exists():
                rescan.write_text("1")
        if (block / "dm").exists():
            run("multipath", "-r", str(device), ok_codes=(0, 1))
