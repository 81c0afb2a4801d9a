"""The node's connector interface: how a published volume becomes a local block device.

One implementation per transport named in publish_context["transport"]: `local` (loop
devices / local LVs), `nvmeof-tcp`, `iscsi` and `rbd` (krbd). publish_context is not secret
(it is kept in VolumeAttachment status); credentials arrive separately as the node-stage
secrets kubelet reads from the Secret the StorageClass names, and are never stored or logged.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

ATTACH_TIMEOUT = 20.0


class Connector(Protocol):
    def attach(self, volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
        """Connect and return the block device; attaching an attached volume returns the same device."""
        ...

    def detach(self, volume_id: str, context: Mapping[str, str], device: str | None) -> None:
        """Disconnect; succeeds when the device has already vanished."""
        ...

    def refresh(self, device: str) -> None:
        """Make the kernel re-read the size after the backend grew the volume."""
        ...


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
