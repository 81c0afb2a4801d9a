"""Transport `iscsi`: iscsiadm login through an iface carrying this node's initiator IQN; the disk
is found by the unit serial the dock set (the volume UUID), waiting for udev up to a deadline.

A dedicated iface (`opensds`) keeps the node's own /etc/iscsi/initiatorname.iscsi untouched.
Several portals mean several sessions, hence one SCSI disk per path for the same LUN: those are
joined by dm-multipath (`multipath.py`), and the node uses the map, never one of the paths.
An export with `auth: chap*` needs chapUser/chapPassword (and chapMutualUser/chapMutualPassword)
from the node-stage secrets; they go into the node record.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pyudev

from opensds_operator.api import CHAP_MUTUAL_PASSWORD, CHAP_MUTUAL_USER, CHAP_PASSWORD, CHAP_USER
from opensds_operator.exports.base import node_iqn

from ..errors import FailedPrecondition, InvalidArgument
from ..run import CommandFailed, run
from . import multipath
from .base import sys_block, wait_for_device

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
