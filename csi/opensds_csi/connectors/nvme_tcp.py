"""Transport `nvmeof-tcp`: nvme-cli connect with this node's host NQN; the device is found by the
namespace UUID the dock set (never by device order), waiting for udev up to a deadline.

Several addresses in publish_context mean several paths: each is connected, and the kernel's
native NVMe multipath presents one device for the namespace. An export with `auth: dhchap*`
needs the DH-HMAC-CHAP secrets from the node-stage secrets (dhchapHostKey[, dhchapCtrlKey]).
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path

import pyudev

from opensds_operator.api import DHCHAP_CTRL_KEY, DHCHAP_HOST_KEY
from opensds_operator.exports.base import node_host_nqn

from ..errors import FailedPrecondition, InvalidArgument
from ..run import CommandFailed, run
from .base import wait_for_device


def find_namespace(volume_uuid: str) -> str | None:
    """The block device of the NVMe namespace with this UUID (a multipath head when there are paths)."""
    context = pyudev.Context()
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        name = device.sys_name
        if not name.startswith("nvme") or "c" in name.removeprefix("nvme").split("n")[0]:
            continue  # nvmeXcYnZ are hidden per-path devices under a multipath head
        attributes = device.attributes
        found = {attributes.get(a) for a in ("uuid", "nguid", "wwid") if a in attributes.available_attributes}
        wanted = volume_uuid.lower()
        if any(v and wanted in v.decode().strip().lower() for v in found if isinstance(v, bytes)):
            return str(device.device_node)
    return None


class NvmeTcpConnector:
    def __init__(self, node_id: str) -> None:
        self.host_nqn = node_host_nqn(node_id)
        self.host_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, self.host_nqn))

    @staticmethod
    def _fields(volume_id: str, context: Mapping[str, str]) -> tuple[str, list[tuple[str, str]], str]:
        try:
            nqn, addresses, volume_uuid = context["nqn"], context["addresses"], context["uuid"]
        except KeyError as e:
            raise InvalidArgument(f"publish_context of {volume_id} lacks {e.args[0]!r}") from None
        portals = [tuple(a.strip().rsplit(":", 1)) for a in addresses.split(",") if a.strip()]
        return nqn, [(p[0], p[1]) for p in portals if len(p) == 2], volume_uuid

    def attach(self, volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
        nqn, portals, volume_uuid = self._fields(volume_id, context)
        keys = [secrets.get(DHCHAP_HOST_KEY, ""), secrets.get(DHCHAP_CTRL_KEY, "")]
        if context.get("auth", "").startswith("dhchap") and not keys[0]:
            raise InvalidArgument(f"volume {volume_id} is exported with DH-HMAC-CHAP: node-stage secrets need "
                                  f"{DHCHAP_HOST_KEY} (the StorageProfile's nodeStageSecretRef)")
        auth = [f"--dhchap-secret={keys[0]}"] if keys[0] else []
        auth += [f"--dhchap-ctrl-secret={keys[1]}"] if keys[0] and keys[1] else []
        errors = []
        for address, port in portals:
            try:
                run("nvme", "connect", "-t", "tcp", "-a", address, "-s", port, "-n", nqn,
                    "-q", self.host_nqn, "-I", self.host_id, *auth, secrets=keys)
            except CommandFailed as e:
                if "already connected" not in e.stderr:
                    errors.append(f"{address}:{port}: {e.stderr.strip()}")
        device = wait_for_device(lambda: find_namespace(volume_uuid), any_path_up=len(errors) < len(portals))
        if device:
            return device
        self.detach(volume_id, context, None)
        raise FailedPrecondition(f"volume {volume_id}: no NVMe namespace {volume_uuid} appeared for host "
                                 f"{self.host_nqn} ({'; '.join(errors) or 'connected, but no device'}); "
                                 f"is the volume published to this node?")

    def detach(self, volume_id: str, context: Mapping[str, str], device: str | None) -> None:
        nqn = context.get("nqn")
        if nqn:
            run("nvme", "disconnect", "-n", nqn, ok_codes=(0, 1))

    def refresh(self, device: str) -> None:
        """The target announces a resize by AEN; a rescan of every controller makes it certain."""
        for controller in sorted(Path("/sys/class/nvme").glob("nvme*")):
            run("nvme", "ns-rescan", f"/dev/{controller.name}", ok_codes=(0, 1))
