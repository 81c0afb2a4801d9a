"""Transport `iscsi`: iscsiadm login through an iface carrying this node's initiator IQN; the disk
is found by the unit serial the dock set (the volume UUID), waiting for udev up to a deadline.

A dedicated iface (`opensds`) keeps the node's own /etc/iscsi/initiatorname.iscsi untouched.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pyudev

from opensds_operator.exports.base import node_iqn

from ..errors import FailedPrecondition, InvalidArgument
from ..run import CommandFailed, run
from .base import wait_for_device

IFACE = "opensds"


def find_disk(serial: str) -> str | None:
    """The SCSI disk whose VPD page 0x80 (unit serial) carries this serial."""
    for device in pyudev.Context().list_devices(subsystem="block", DEVTYPE="disk"):
        vpd = Path(device.sys_path) / "device" / "vpd_pg80"
        try:
            if serial.encode() in vpd.read_bytes():
                return str(device.device_node)
        except OSError:
            continue
    return None


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

    def attach(self, volume_id: str, context: Mapping[str, str]) -> str:
        iqn, portals, serial = self._fields(volume_id, context)
        existing = find_disk(serial)
        if existing:
            return existing
        self._iface()
        errors = []
        for portal in portals:
            base = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-I", IFACE]
            try:
                run(*base, "-o", "new")
                run(*base, "--login", ok_codes=(0, 15))  # 15: session exists
            except CommandFailed as e:
                errors.append(f"{portal}: {e.stderr.strip()}")
        device = wait_for_device(lambda: find_disk(serial), any_path_up=len(errors) < len(portals))
        if device:
            return device
        self.detach(volume_id, context, None)
        raise FailedPrecondition(f"volume {volume_id}: no disk with serial {serial} appeared for initiator "
                                 f"{self.initiator} ({'; '.join(errors) or 'logged in, but no disk'}); "
                                 f"is the volume published to this node?")

    def detach(self, volume_id: str, context: Mapping[str, str], device: str | None) -> None:
        iqn = context.get("iqn")
        if not iqn:
            return
        if device and Path(device).exists():
            run("blockdev", "--flushbufs", device, ok_codes=(0, 1))
        run("iscsiadm", "-m", "node", "-T", iqn, "-I", IFACE, "--logout", ok_codes=(0, 21))  # 21: no session
        run("iscsiadm", "-m", "node", "-T", iqn, "-I", IFACE, "-o", "delete", ok_codes=(0, 21))

    def refresh(self, device: str) -> None:
        rescan = Path(f"/sys/block/{Path(device).name}/device/rescan")
        if rescan.exists():
            rescan.write_text("1")
