"""The node's connector interface: how a published volume becomes a local block device.

One implementation per transport named in publish_context["transport"]: `local` (loop
devices / local LVs), `nvmeof-tcp`, `iscsi` and `rbd` (krbd). publish_context is not secret
(it is kept in VolumeAttachment status); credentials arrive separately as the node-stage
secrets kubelet reads from the Secret the StorageClass names, and are never stored or logged.

publish_context is not trusted either: whoever can write a Volume's status could point a node
at a host disk or another volume. Each connector names the volume UID its context claims
(`volume_uid`; the node compares it with the UID the controller put into volume_context) and
accepts only objects that carry exactly that UID in the exporter's own naming (vol-<uid>,
the namespace UUID, the unit serial), never a substring or an empty match.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from opensds_operator.api import valid_uid

from ..errors import InvalidArgument

ATTACH_TIMEOUT = 20.0


class Connector(Protocol):
    def volume_uid(self, volume_id: str, context: Mapping[str, str]) -> str:
        """The volume UID this publish_context names; InvalidArgument when it names none exactly."""
        ...

    def attach(self, volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
        """Connect and return the block device; attaching an attached volume returns the same device."""
        ...

    def detach(self, volume_id: str, context: Mapping[str, str], device: str | None) -> None:
        """Disconnect; succeeds when the device has already vanished."""
        ...

    def refresh(self, device: str) -> None:
        """Make the kernel re-read the size after the backend grew the volume."""
        ...

    def identify(self, device: str) -> dict[str, str] | None:
        """The publish_context that detaches this device, rebuilt from sysfs (None: not ours).

        For NodeUnstage when the node's record of the volume is unreadable.
        """
        ...


def require_uid(volume_id: str, what: str, value: str | None) -> str:
    """value, when it is a full volume UID; InvalidArgument otherwise (empty matches nothing)."""
    if not value or not valid_uid(value):
        raise InvalidArgument(f"publish_context of {volume_id}: {what} {value!r} is not a volume UID")
    return value


def context_field(volume_id: str, context: Mapping[str, str], key: str) -> str:
    value = context.get(key)
    if not value:
        raise InvalidArgument(f"publish_context of {volume_id} lacks {key!r}")
    return value


def wait_for_device(find: Callable[[], str | None], any_path_up: bool, timeout: float = ATTACH_TIMEOUT) -> str | None:
    """Poll udev's view until the device shows up; no wait at all when every path failed."""
    deadline = time.monotonic() + (timeout if any_path_up else 0)
    while True:
        device = find()
        if device or time.monotonic() >= deadline:
            return device
        time.sleep(0.2)


def sys_block(device: str) -> Path:
    """/sys/block/<name> of a device node (symlinks such as /dev/mapper/x resolved)."""
    return Path("/sys/block") / Path(device).resolve().name
