"""Transport `nvmeof-tcp`: connect with this node's host NQN; the device is found by the
namespace UUID the dock set (never by device order), waiting for udev up to a deadline.

The connection is made the way nvme-cli makes it, by writing the option string to the
kernel's /dev/nvme-fabrics, but from this process: DH-HMAC-CHAP secrets
(dhchapHostKey[, dhchapCtrlKey] from the node-stage secrets) thus never appear on a command
line, where /proc/<pid>/cmdline would show them to every local user. Every value put into
that string is checked first (no ',' or '=' can smuggle another option in).

Only this volume's subsystem (`volume_nqn(vol-<uid>)`) is connected, and only a namespace
whose UUID, NGUID or WWID is exactly that UID is taken: an empty or partial uuid matches
nothing. Several addresses in publish_context mean several paths: each is connected, and the
kernel's native NVMe multipath presents one device for the namespace.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import pyudev

from opensds_operator.api import (
    CTX_ADDRESSES,
    CTX_AUTH,
    CTX_NQN,
    CTX_TRANSPORT,
    CTX_UUID,
    DHCHAP_CTRL_KEY,
    DHCHAP_HOST_KEY,
    valid_uid,
    volume_backend_id,
)
from opensds_operator.exports.base import node_host_nqn, volume_nqn

from ..errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from ..mounts import bounded
from ..run import run
from .base import context_field, require_uid, sys_block, wait_for_device

log = logging.getLogger(__name__)
FABRICS = Path("/dev/nvme-fabrics")
# Above the kernel's own admin command timeout (60 s): a target that stops answering during
# DH-HMAC-CHAP makes the kernel wait that long before it reports the failure.
CONNECT_TIMEOUT = 100.0
_DHCHAP_KEY = re.compile(r"DHHC-1:[0-9a-f]{2}:[A-Za-z0-9+/]+={0,2}:")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9.:_\[\]-]+")  # NQNs, addresses, ports: nothing that splits options


def namespace_matches(attributes: Mapping[str, str], volume_uid: str) -> bool:
    """Whether a namespace's sysfs uuid / nguid / wwid is exactly this UUID (never a substring)."""
    if not valid_uid(volume_uid):
        return False  # an empty or partial UUID matches nothing, least of all the host's own disk
    wanted = volume_uid.lower()
    hex_only = wanted.replace("-", "")
    for name, raw in attributes.items():
        value = raw.strip().lower()
        if name == "uuid" and value == wanted:
            return True
        if name == "nguid" and value.replace("-", "") == hex_only:
            return True
        if name == "wwid" and value in (f"uuid.{wanted}", f"eui.{hex_only}"):
            return True
    return False


def find_namespace(volume_uuid: str) -> str | None:
    """The block device of the NVMe namespace with this UUID (a multipath head when there are paths)."""
    if not valid_uid(volume_uuid):
        return None
    context = pyudev.Context()
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        name = device.sys_name
        if not name.startswith("nvme") or "c" in name.removeprefix("nvme").split("n")[0]:
            continue  # nvmeXcYnZ are hidden per-path devices under a multipath head
        attributes = device.attributes
        found = {}
        for attribute in ("uuid", "nguid", "wwid"):
            if attribute in attributes.available_attributes:
                value = attributes.get(attribute)
                if isinstance(value, bytes):
                    found[attribute] = value.decode(errors="replace")
        if namespace_matches(found, volume_uuid):
            return str(device.device_node)
    return None


def connect_options(nqn: str, address: str, port: str, host_nqn: str, host_id: str,
                    host_key: str = "", ctrl_key: str = "") -> str:
    """The option string /dev/nvme-fabrics takes (what `nvme connect` writes), every value checked."""
    for what, value in (("nqn", nqn), ("address", address), ("port", port), ("host nqn", host_nqn),
                        ("host id", host_id)):
        if not _SAFE_VALUE.fullmatch(value):
            raise InvalidArgument(f"NVMe/TCP {what} {value!r} holds characters a connect option cannot")
    for what, key in ((DHCHAP_HOST_KEY, host_key), (DHCHAP_CTRL_KEY, ctrl_key)):
        if key and not _DHCHAP_KEY.fullmatch(key):
            raise InvalidArgument(f"node-stage secret {what} is not a DH-HMAC-CHAP secret (DHHC-1:xx:<base64>:)")
    options = [f"nqn={nqn}", "transport=tcp", f"traddr={address.strip('[]')}", f"trsvcid={port}",
               f"hostnqn={host_nqn}", f"hostid={host_id}"]
    if host_key:
        options.append(f"dhchap_secret={host_key}")
        if ctrl_key:
            options.append(f"dhchap_ctrl_secret={ctrl_key}")
    return ",".join(options)


def fabrics_connect(options: str, fabrics: Path | None = None) -> bool:
    """Create a controller; False when it exists already. OSError carries the kernel's refusal."""
    fd = os.open(FABRICS if fabrics is None else fabrics, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.write(fd, options.encode())
        os.read(fd, 4096)  # "instance=N,cntlid=M"
        return True
    except OSError as e:
        if e.errno == errno.EALREADY:
            return False
        raise
    finally:
        os.close(fd)


class NvmeTcpConnector:
    def __init__(self, node_id: str) -> None:
        self.host_nqn = node_host_nqn(node_id)
        self.host_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, self.host_nqn))

    def volume_uid(self, volume_id: str, context: Mapping[str, str]) -> str:
        uid = require_uid(volume_id, "namespace uuid", context.get(CTX_UUID))
        nqn = context_field(volume_id, context, CTX_NQN)
        if nqn != volume_nqn(volume_backend_id(uid)):
            raise InvalidArgument(f"publish_context of {volume_id}: subsystem {nqn!r} is not the subsystem of "
                                  f"volume {uid} ({volume_nqn(volume_backend_id(uid))})")
        return uid

    def _fields(self, volume_id: str, context: Mapping[str, str]) -> tuple[str, list[tuple[str, str]], str]:
        volume_uuid = self.volume_uid(volume_id, context)
        addresses = context_field(volume_id, context, CTX_ADDRESSES)
        portals = [tuple(a.strip().rsplit(":", 1)) for a in addresses.split(",") if a.strip()]
        return context[CTX_NQN], [(p[0], p[1]) for p in portals if len(p) == 2], volume_uuid

    def _connect(self, options: str, nqn: str) -> None:
        if not FABRICS.exists():
            run("modprobe", "nvme-fabrics", ok_codes=(0, 1))
        run("modprobe", "nvme-tcp", ok_codes=(0, 1))  # the kernel would request it too; be explicit
        started = time.monotonic()
        try:
            done = bounded(f"nvme-connect:{nqn}", lambda: fabrics_connect(options), CONNECT_TIMEOUT)
        finally:
            log.info("connect to %s took %.1f s", nqn, time.monotonic() - started)
        if done is None:
            raise DeadlineExceeded(f"connecting to {nqn} did not finish within {CONNECT_TIMEOUT:g} s")

    def attach(self, volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
        nqn, portals, volume_uuid = self._fields(volume_id, context)
        host_key, ctrl_key = secrets.get(DHCHAP_HOST_KEY, ""), secrets.get(DHCHAP_CTRL_KEY, "")
        if context.get(CTX_AUTH, "").startswith("dhchap") and not host_key:
            raise InvalidArgument(f"volume {volume_id} is exported with DH-HMAC-CHAP: node-stage secrets need "
                                  f"{DHCHAP_HOST_KEY} (the StorageProfile's nodeStageSecretRef)")
        errors = []
        for address, port in portals:
            options = connect_options(nqn, address, port, self.host_nqn, self.host_id, host_key, ctrl_key)
            try:
                self._connect(options, nqn)
            except OSError as e:  # the kernel's answer; the options (and keys) are not in it
                errors.append(f"{address}:{port}: {e.strerror or e} (errno {e.errno})")
        device = wait_for_device(lambda: find_namespace(volume_uuid), any_path_up=len(errors) < len(portals))
        if device:
            return device
        self.detach(volume_id, context, None)
        raise FailedPrecondition(f"volume {volume_id}: no NVMe namespace {volume_uuid} appeared for host "
                                 f"{self.host_nqn} ({'; '.join(errors) or 'connected, but no device'}); "
                                 f"is the volume published to this node?")

    def detach(self, volume_id: str, context: Mapping[str, str], device: str | None) -> None:
        nqn = context.get(CTX_NQN)
        if nqn:
            run("nvme", "disconnect", "-n", nqn, ok_codes=(0, 1))

    def refresh(self, device: str) -> None:
        """The target announces a resize by AEN; a rescan of every controller makes it certain."""
        for controller in sorted(Path("/sys/class/nvme").glob("nvme*")):
            run("nvme", "ns-rescan", f"/dev/{controller.name}", ok_codes=(0, 1))

    def identify(self, device: str) -> dict[str, str] | None:
        try:
            nqn = (sys_block(device) / "device" / "subsysnqn").read_text().strip()
        except OSError:
            return None
        if not nqn.startswith(volume_nqn("vol-")):
            return None
        return {CTX_TRANSPORT: "nvmeof-tcp", CTX_NQN: nqn}
